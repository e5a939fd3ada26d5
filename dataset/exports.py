"""The exports written at the end of a build from its committed parts: ``sft.jsonl`` and ``pairs.parquet``; and
their readers for fine-tuning (``forest train-policy``)."""

from __future__ import annotations

import json

from dataset.layout import ERRORS, PAIRS, PAIRS_EXPORT, SFT_EXPORT, TREES, open_output, write_atomically
from dataset.reader import read_kind
from dataset.schema import ERROR_SCHEMA, PAIR_SCHEMA, TREE_SCHEMA
from dataset.writer import write_manifest


def write_exports(output: str, manifest: dict) -> dict:
    """Write ``sft.jsonl``, ``pairs.parquet`` and ``manifest.json`` (with the counts); returns the counts.

    ``sft.jsonl`` is Marco-o1's CoT format, one ``{"instruction", "response"}`` per tree that reached an
    answer (and, when a reference exists, the right one).
    """
    filesystem, root = open_output(output)
    trees = read_kind(output, TREES, TREE_SCHEMA, columns=["problem_id", "question", "response", "final_answer",
                                                          "correct"])
    lines = []
    for row in trees.to_pylist():
        if row["final_answer"] is not None and row["correct"] is not False:
            lines.append(json.dumps({"instruction": row["question"], "response": row["response"]},
                                    ensure_ascii=False))
    write_atomically(filesystem, f"{root}/{SFT_EXPORT}", data=("\n".join(lines) + "\n" if lines else "").encode())
    pairs = read_kind(output, PAIRS, PAIR_SCHEMA)
    write_atomically(filesystem, f"{root}/{PAIRS_EXPORT}", pairs)
    errors = read_kind(output, ERRORS, ERROR_SCHEMA, columns=["problem_id"])
    counts = {"trees": trees.num_rows, "sft_rows": len(lines), "pairs": pairs.num_rows, "errors": errors.num_rows,
              "correct": sum(1 for c in trees.column("correct").to_pylist() if c)}
    write_manifest(output, {**manifest, "counts": counts})
    return counts


class SftDataError(ValueError):
    """An ``sft.jsonl`` that cannot be trained on; the message names the file and the line."""


def read_sft(path: str) -> list[dict]:
    """The ``{"instruction", "response"}`` rows of an ``sft.jsonl`` (a local path or a filesystem URI)."""
    filesystem, file = open_output(path)
    try:
        with filesystem.open_input_stream(file) as f:
            text = f.read().decode("utf-8")
    except (FileNotFoundError, OSError) as exc:
        raise SftDataError(f"{path}: cannot read it ({exc})") from exc
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SftDataError(f"{path} line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip()
                                                for k in ("instruction", "response")):
            raise SftDataError(f"{path} line {number}: expected an object with non-empty string fields "
                               f"'instruction' and 'response'")
        rows.append(row)
    if not rows:
        raise SftDataError(f"{path}: no rows (a build writes one per tree that reached a right answer)")
    return rows


class PairsDataError(ValueError):
    """A ``pairs.parquet`` that cannot be trained on; the message names the file and what is wrong."""


PAIR_FIELDS = ("problem_id", "question", "prefix", "chosen", "rejected")  # what a DPO pass reads


def read_pairs(path: str) -> list[dict]:
    """The preference pairs of a ``pairs.parquet`` (a local path or a filesystem URI): ``PAIR_FIELDS`` per row."""
    import pyarrow.parquet as pq

    filesystem, file = open_output(path)
    try:
        table = pq.read_table(file, filesystem=filesystem)
    except (FileNotFoundError, OSError) as exc:
        raise PairsDataError(f"{path}: cannot read it ({exc})") from exc
    missing = [name for name in PAIR_FIELDS if name not in table.column_names]
    if missing:
        raise PairsDataError(f"{path}: no column {', '.join(missing)} (pairs written before pairs carried the "
                             f"question and the prefix: build again)")
    rows = table.select(list(PAIR_FIELDS)).to_pylist()
    for number, row in enumerate(rows, 1):
        if not all(isinstance(row[k], str) for k in PAIR_FIELDS) or not (row["chosen"] and row["rejected"]):
            raise PairsDataError(f"{path} row {number}: expected strings in {', '.join(PAIR_FIELDS)}, and a "
                                 f"non-empty chosen and rejected")
    if not rows:
        raise PairsDataError(f"{path}: no pairs (a build writes them where a chosen node has a worse visited "
                             f"sibling)")
    return rows
