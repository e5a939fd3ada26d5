"""Step-level value labels from the trees a build wrote: the training data of ``forest train-value``.

Every finished line of a tree (a root-to-leaf path the model ended with an answer) has an outcome: its answer
against the problem's reference. Every node has a Monte-Carlo estimate of its prefix's quality: the share of the
finished lines below it that are correct (the Q-value estimate of Math-Shepherd and rStar-Math). One example per
finished line: the prompt and the line's tokens, with the estimate of each node on the line at the node's last
token (a step end). Lines cut by a budget or a limit tell nothing about correctness and are left out of the
counts.

With a step check (``search.checks``), a line counts as right for the labels only when it also passes the check:
a step that writes a false equation then gets 0, as does every step after it, whatever answer the line reached (a
right answer after a false step is luck). This is automatic process supervision, as Math-Shepherd's estimates are,
with a denser signal: the label drops at the step where the error was written. The examples' ``correct`` stays the
line's outcome, which the dev AUROC is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow.compute as pc

from dataset.layout import NODES, TREES
from dataset.reader import read_kind
from dataset.schema import NODE_SCHEMA, TREE_SCHEMA
from search.checks import passes
from search.params import StepCheck
from search.prompts import OUTPUT_END, answers_match, extract_answer

NODE_COLUMNS = ["tree_id", "node_id", "parent_id", "token_ids", "text", "is_terminal"]
TREE_COLUMNS = ["tree_id", "problem_id", "prompt_token_ids", "reference_answer"]


class ValueDataError(ValueError):
    """Build outputs that cannot give value labels; the message says which and why."""


@dataclass(frozen=True, slots=True)
class ValueExample:
    """One finished line: ``token_ids`` (int32, prompt + line), the step ends ``positions`` (indices into it) with
    their labels (float32, the share of correct finished lines below that node), and the line's own outcome."""

    problem_id: str
    token_ids: np.ndarray
    positions: np.ndarray
    labels: np.ndarray
    correct: bool
    prompt_length: int = 0  # the first ``prompt_length`` of ``token_ids`` are the prompt


def tree_examples(problem_id: str, prompt_token_ids: Sequence[int], nodes: Sequence[dict],
                  reference: str, check: StepCheck = StepCheck.OFF) -> list[ValueExample]:
    """The examples of one tree; ``nodes`` are its node rows (node_id, parent_id, token_ids, text, is_terminal);
    with a ``check``, only lines that pass it count as right in the labels (see the module)."""
    by_id = {int(n["node_id"]): n for n in nodes}
    parent = {i: int(n["parent_id"]) for i, n in by_id.items()}
    has_children = {p for p in parent.values() if p in by_id}
    paths, outcome, sound = {}, {}, {}
    for leaf, node in sorted(by_id.items()):
        if not node["is_terminal"] or leaf in has_children:
            continue
        path = _path(leaf, parent)
        response = "".join(by_id[i]["text"] or "" for i in path)
        answer = extract_answer(response)
        if answer is None or OUTPUT_END not in response:
            continue  # cut by a budget or a limit: no outcome
        paths[leaf], outcome[leaf] = path, answers_match(answer, reference)
        sound[leaf] = outcome[leaf] and passes(check, response, complete=True)
    right: dict[int, int] = {}
    total: dict[int, int] = {}
    for leaf, path in paths.items():
        for i in path:
            total[i] = total.get(i, 0) + 1
            right[i] = right.get(i, 0) + int(sound[leaf])
    examples = []
    prompt = np.asarray(prompt_token_ids, dtype=np.int32)
    for leaf, path in paths.items():
        pieces, positions, labels, end = [prompt], [], [], len(prompt)
        for i in path:
            tokens = np.asarray(by_id[i]["token_ids"] or [], dtype=np.int32)
            if not len(tokens):
                continue  # the root
            pieces.append(tokens)
            end += len(tokens)
            positions.append(end - 1)
            labels.append(right[i] / total[i])
        examples.append(ValueExample(problem_id, np.concatenate(pieces), np.asarray(positions, dtype=np.int64),
                                     np.asarray(labels, dtype=np.float32), outcome[leaf], len(prompt)))
    return examples


def _path(node: int, parent: dict[int, int]) -> list[int]:
    path = [node]
    while parent.get(path[-1], -1) in parent:
        path.append(parent[path[-1]])
    return path[::-1]


def read_value_examples(outputs: Sequence[str], check: StepCheck = StepCheck.OFF) -> list[ValueExample]:
    """Every finished line of every tree in the build ``outputs`` (local paths or URIs), as labelled examples
    (with ``check``: see the module).

    ``ValueDataError`` when an output holds no trees, or trees without a reference answer (labels need one)."""
    if not outputs:
        raise ValueDataError("no build output given")
    examples = []
    for output in outputs:
        trees = read_kind(output, TREES, TREE_SCHEMA, columns=TREE_COLUMNS)
        if trees.num_rows == 0:
            raise ValueDataError(f"{output}: no committed trees (is it a `forest build` output?)")
        missing = trees.filter(pc.is_null(trees["reference_answer"])).num_rows
        if missing:
            raise ValueDataError(f"{output}: {missing} of {trees.num_rows} trees have no reference answer; value "
                                 f"labels need the problems' answers (build from problems with an answer field)")
        nodes = read_kind(output, NODES, NODE_SCHEMA, columns=NODE_COLUMNS)
        by_tree: dict[str, list[dict]] = {}
        for row in nodes.to_pylist():
            by_tree.setdefault(row["tree_id"], []).append(row)
        for tree in trees.to_pylist():
            examples += tree_examples(tree["problem_id"], tree["prompt_token_ids"], by_tree.get(tree["tree_id"], []),
                                      tree["reference_answer"], check)
    return examples
