"""Reading a build's output back: resume bookkeeping and the final exports (``sft.jsonl``, ``pairs.parquet``)."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.dataset as ds
from pyarrow import fs as pafs

from actors.records import ERROR_SCHEMA, PAIR_SCHEMA, TREE_SCHEMA
from actors.sink import open_output, write_atomically

log = logging.getLogger(__name__)


def _parts(filesystem: pafs.FileSystem, folder: str) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(folder, allow_not_found=True)
    return [f for f in filesystem.get_file_info(selector) if f.type == pafs.FileType.File]


def read_parts(filesystem: pafs.FileSystem, folder: str, schema: pa.Schema, columns=None) -> pa.Table:
    """All committed parts of one folder (temporary ``_tmp-`` files are ignored)."""
    paths = [f.path for f in _parts(filesystem, folder) if not f.base_name.startswith(("_", "."))]
    if not paths:
        return schema.empty_table().select(columns or schema.names)
    return ds.dataset(paths, filesystem=filesystem, format="parquet", schema=schema).to_table(columns=columns)


def remove_uncommitted(output: str) -> int:
    """Delete temporary files and node/pair parts whose trees part was never written; returns how many."""
    filesystem, root = open_output(output)
    committed = {f.base_name for f in _parts(filesystem, f"{root}/trees")}
    removed = 0
    for kind in ("nodes", "pairs", "trees", "errors"):
        for info in _parts(filesystem, f"{root}/{kind}"):
            orphan = kind in ("nodes", "pairs") and info.base_name not in committed
            if orphan or info.base_name.startswith("_tmp-"):
                filesystem.delete_file(info.path)
                removed += 1
    if removed:
        log.info("resume: removed %d uncommitted files", removed)
    return removed


def committed_problem_ids(output: str) -> set[str]:
    filesystem, root = open_output(output)
    table = read_parts(filesystem, f"{root}/trees", TREE_SCHEMA, columns=["problem_id"])
    return set(table.column("problem_id").to_pylist())


def recorded_errors(output: str) -> set[tuple[str, str, str]]:
    filesystem, root = open_output(output)
    table = read_parts(filesystem, f"{root}/errors", ERROR_SCHEMA, columns=["problem_id", "stage", "message"])
    return set(zip(*(table.column(c).to_pylist() for c in ("problem_id", "stage", "message")), strict=True))


def read_manifest(output: str) -> dict | None:
    filesystem, root = open_output(output)
    path = f"{root}/manifest.json"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as f:
        return json.loads(f.read())


def write_exports(output: str, manifest: dict) -> dict:
    """Write ``sft.jsonl``, ``pairs.parquet`` and ``manifest.json`` from the committed parts; returns counts.

    ``sft.jsonl`` is Marco-o1's CoT format, one ``{"instruction", "response"}`` per tree that reached an
    answer (and, when a reference exists, the right one).
    """
    filesystem, root = open_output(output)
    trees = read_parts(filesystem, f"{root}/trees", TREE_SCHEMA,
                       columns=["problem_id", "question", "response", "final_answer", "correct"])
    lines = []
    for row in trees.to_pylist():
        if row["final_answer"] is not None and row["correct"] is not False:
            lines.append(json.dumps({"instruction": row["question"], "response": row["response"]},
                                    ensure_ascii=False))
    write_atomically(filesystem, f"{root}/sft.jsonl", data=("\n".join(lines) + "\n" if lines else "").encode())
    pairs = read_parts(filesystem, f"{root}/pairs", PAIR_SCHEMA)
    write_atomically(filesystem, f"{root}/pairs.parquet", pairs)
    errors = read_parts(filesystem, f"{root}/errors", ERROR_SCHEMA, columns=["problem_id"])
    counts = {"trees": trees.num_rows, "sft_rows": len(lines), "pairs": pairs.num_rows, "errors": errors.num_rows,
              "correct": sum(1 for c in trees.column("correct").to_pylist() if c)}
    manifest = {**manifest, "counts": counts}
    write_atomically(filesystem, f"{root}/manifest.json", data=json.dumps(manifest, indent=2, default=str).encode())
    return counts
