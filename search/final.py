"""The answer of a search: a rule over every finished line of the tree.

A finished line is a path from the root to a terminal leaf that the model itself ended (end of ``<Output>`` or
EOS) with an answer; its value is the leaf's (each terminal leaf is valued once; NaN for a sibling nobody
valued, which then weighs nothing). Rules (``FinalChoice``):
``vote`` sums the values of the lines per (normalised) answer and takes the largest sum; ``best_value`` takes the
best-valued line; ``most_visits`` descends by visits, as Marco-o1 does, and gives way to the best-valued line when
that descent ends at no finished line. The response is the best-valued line that gives the chosen answer.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from search.mcts import most_visited_path
from search.params import FinalChoice
from search.prompts import OUTPUT_END, extract_answer, normalize_answer
from search.protocol import FinishReason
from search.tree import Tree


@dataclass(frozen=True, slots=True)
class Line:
    leaf: int
    answer: str  # as written in <Output>
    key: str  # the normalised answer (what votes and comparisons use)
    value: float

    @classmethod
    def of(cls, leaf: int, answer: str, value: float) -> Line:
        return cls(leaf, answer, normalize_answer(answer), value)


def line_finished(tree: Tree, node: int, response: str) -> bool:
    """The line ends because the model finished its answer (not because a budget or limit cut it)."""
    return OUTPUT_END in response or tree.nodes["finish_reason"][node] == FinishReason.EOS


def line_answer(tree: Tree, leaf: int, response: str) -> str | None:
    """The answer of the line ``response`` ending at ``leaf``; None unless the model finished it with one."""
    answer = extract_answer(response)
    return answer if answer is not None and line_finished(tree, leaf, response) else None


def finished_lines(tree: Tree, decode: Callable[[Sequence[int]], str],
                   known: dict[int, str | None] | None = None) -> list[Line]:
    """Every finished line of the tree, in leaf-id order. ``known``: ``line_answer`` of leaves already decoded."""
    n, lines, known = tree.nodes, [], known or {}
    for leaf in range(1, tree.num_nodes):
        if not n["is_terminal"][leaf] or n["num_children"][leaf]:
            continue
        answer = known[leaf] if leaf in known else line_answer(tree, leaf, decode(tree.path_token_ids(leaf).tolist()))
        if answer is not None:
            lines.append(Line.of(leaf, answer, tree.mean_value(leaf)))
    return lines


def _best(lines: list[Line]) -> Line:
    """The highest-valued line (one nobody valued ranks last), the earliest on a tie."""
    return max(lines, key=lambda line: (True, line.value, -line.leaf) if line.value == line.value
               else (False, 0.0, -line.leaf))


def choose(tree: Tree, lines: Sequence[Line], rule: FinalChoice, set_aside: Sequence[Line] = ()) -> Line | None:
    """The line ``rule`` picks among ``lines``; when there is none, among the finished lines the value model set
    aside (``set_aside``, valued by their scores); None when there is neither."""
    lines = lines or set_aside
    if not lines:
        return None
    if rule is FinalChoice.VOTE:
        weight: dict[str, float] = collections.defaultdict(float)
        for line in lines:
            weight[line.key] += max(float(np.nan_to_num(line.value, nan=0.0)), 0.0)
        count = collections.Counter(line.key for line in lines)
        winner = max(weight, key=lambda key: (weight[key], count[key]))
        return _best([line for line in lines if line.key == winner])
    if rule is FinalChoice.MOST_VISITS:
        leaf = most_visited_path(tree)[-1]
        for line in lines:
            if line.leaf == leaf:
                return line
    return _best(lines)


def ranked_leaves(tree: Tree, decode: Callable[[Sequence[int]], str], first: int, n: int) -> list[int]:
    """Up to ``n`` leaves of token-distinct ended lines: ``first`` (the chosen line), then the finished lines, then
    the lines a limit cut, each group by value (a line nobody valued by its confidence, after the valued ones).

    What a request for ``n`` alternatives gets: the tree's own lines, no new search."""
    nodes = tree.nodes
    candidates = []
    for leaf in range(1, tree.num_nodes):
        if leaf == first or not nodes["is_terminal"][leaf] or nodes["num_children"][leaf]:
            continue
        finished = line_finished(tree, leaf, decode(tree.path_token_ids(leaf).tolist()))
        value, confidence = tree.mean_value(leaf), float(nodes["confidence"][leaf])
        candidates.append(((finished, value == value, np.nan_to_num(value, nan=-np.inf),
                            np.nan_to_num(confidence, nan=-np.inf), -leaf), leaf))
    seen, leaves = {tree.path_token_ids(first).tobytes()}, [first]
    for _, leaf in sorted(candidates, reverse=True):
        if len(leaves) >= n:
            break
        key = tree.path_token_ids(leaf).tobytes()
        if key not in seen:
            seen.add(key)
            leaves.append(leaf)
    return leaves[:n]
