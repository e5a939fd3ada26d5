"""The MCTS phases as small functions over a ``Tree`` (no I/O, no engine).

Engine calls are asynchronous, so a phase that needs the model stops at a request and a separate
function applies the result (``search.driver`` makes the call in between):

1. ``select``: descend from the root by UCT (values normalised, exhausted subtrees skipped) until a node without
   children or one that may widen, adding virtual loss on the way.
2. ``expand``: the engine samples ``k`` chunks from the node (one request, ``n=k``); identical samples merge
   (``find_sibling``), and a reflection child is added where the policy asks for one.
3. ``simulate``: the engine continues a new child to a terminal state; the rollout's steps become children
   (``split_points``) and the line is valued by a value function.
4. ``backup``: visits and value sums along the path; the virtual loss is removed; ``refresh_exhausted``.
5. The answer: a rule over the tree's finished lines (``search.final``).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from search.params import Granularity, ReflectionMode, ReflectionPolicy
from search.prompts import OUTPUT_END, OUTPUT_START, THOUGHT_END, answers_match
from search.protocol import Chunk, FinishReason
from search.tree import NO_PARENT, ROOT, NodeKind, Tree

_REFLECTION = int(NodeKind.REFLECTION)  # enum members as plain ints on hot paths (enum lookups are slow)
_EOS = int(FinishReason.EOS)

TEXT_OVERLAP_TOKENS = 8
"""Tokens of the parent's path decoded with a chunk, so a tag split across two chunks is still seen."""


Bounds = tuple[float, float]
"""(lowest, highest) value backed up in a tree so far: UCT sees values min-max normalised into [0, 1]."""


def normalize(value: float, bounds: Bounds | None) -> float:
    """``value`` mapped into [0, 1] by ``bounds`` (unchanged without bounds; 0.5 while all values are equal)."""
    if bounds is None:
        return value
    low, high = bounds
    return (value - low) / (high - low) if high > low else 0.5


def _uct_scores(tree: Tree, node: int, exploration: float, bounds: Bounds | None) -> list[float]:
    """UCT score per child of ``node``: Q + c * sqrt(ln N_parent / N_child), Q normalised by ``bounds``.

    Virtual loss counts as visits with value 0, so in-flight paths look worse and concurrent selections
    spread out. Unvisited children (no visits, none in flight) score +inf: they are tried first.
    A child that is a leaf with a request in flight, or whose subtree is exhausted, scores -inf: nothing can be
    done there. Plain Python over the few children: numpy's per-call overhead would dominate
    (see ``forest bench manager``).
    """
    n = tree.nodes
    visits, virtual, value_sum = n["visits"], n["virtual_loss"], n["value_sum"]
    pending, num_children, exhausted = n["pending"], n["num_children"], n["exhausted"]
    log_parent = math.log(max(float(visits[node] + virtual[node]), 1.0))
    scores = []
    for kid in tree.children(node).tolist():
        seen = int(visits[kid])
        count = float(seen + int(virtual[kid]))
        if exhausted[kid] or (pending[kid] and num_children[kid] == 0):
            scores.append(-math.inf)
        elif count > 0:
            # in-flight iterations count as visits worth nothing (virtual loss); a child whose first iteration is
            # still in flight (its value on its way from a value model) has no mean yet
            mean = normalize(float(value_sum[kid]) / seen, bounds) if seen else 0.0
            q = mean * seen / count
            scores.append(q + exploration * math.sqrt(log_parent / count))
        else:
            scores.append(math.inf)
    return scores


def uct_scores(tree: Tree, node: int, exploration: float, bounds: Bounds | None = None) -> np.ndarray:
    """``_uct_scores`` as an array."""
    return np.array(_uct_scores(tree, node, exploration, bounds), dtype=np.float64)


def add_virtual_loss(tree: Tree, node: int, amount: int) -> None:
    for i in tree.path(node):
        tree.nodes["virtual_loss"][i] += amount


def select(tree: Tree, exploration: float, *, bounds: Bounds | None = None,
           can_widen: Callable[[int], bool] | None = None) -> int | None:
    """Descend from the root to a node to work on, adding one virtual loss along the path: a node without
    children, or one that ``can_widen`` says may get another child (progressive widening).

    Returns None (and changes nothing) when the root is exhausted or every way down ends at a leaf that is
    waiting for the engine.
    """
    n = tree.nodes
    node = ROOT
    if n["exhausted"][ROOT] or (n["pending"][ROOT] and n["num_children"][ROOT] == 0):
        return None
    while n["num_children"][node] > 0:
        if can_widen is not None and not n["pending"][node] and can_widen(node):
            break
        scores = _uct_scores(tree, node, exploration, bounds)
        top = max(scores)  # the first child with the top score, as np.argmax picks
        if top == -math.inf:
            return None
        node = int(tree.children(node)[scores.index(top)])
    add_virtual_loss(tree, node, 1)
    return node


def backup(tree: Tree, leaf: int, value: float, *, selected: int | None = None) -> None:
    """Add one visit and ``value`` on the path root..leaf, removing the virtual loss ``select`` added on the path
    root..selected (``selected`` defaults to ``leaf``; a rollout's steps below it never had any)."""
    n = tree.nodes
    path = tree.path(leaf)
    n["visits"][path] += 1  # a path holds each node once, so fancy-indexed += is exact
    n["value_sum"][path] += value
    selected = leaf if selected is None else selected
    depth = int(n["depth"][selected])
    on_selected = path[:depth + 1] if depth < len(path) and path[depth] == selected else tree.path(selected)
    n["virtual_loss"][on_selected] -= 1


def _children_state(tree: Tree, node: int) -> tuple[int, bool]:
    """(samples the model generated below ``node``, whether it has children and every one is exhausted), in one
    pass. Merged samples count (their weights): a sample that repeated a sibling still used up a try. A reflection
    child is forced, so not counted against the width."""
    n = tree.nodes
    kind, weight, exhausted = n["kind"], n["weight"], n["exhausted"]  # Python over the few children: no numpy
    generated, kids, all_exhausted = 0, tree.children(node).tolist(), True
    for kid in kids:
        if kind[kid] != _REFLECTION:
            generated += int(weight[kid])
        all_exhausted = all_exhausted and bool(exhausted[kid])
    return generated, bool(kids) and all_exhausted


def allowed_width(tree: Tree, node: int, *, children: int, widening: float, max_width: int) -> int:
    """How many generated children ``node`` may have now: ``children`` (k), plus progressive widening's
    floor(widening * sqrt(visits)), plus one more when every child is exhausted (so a step whose children all
    failed can be retried); never more than ``max_width``."""
    return _allowed_width(tree, node, _children_state(tree, node), children, widening, max_width)


def _allowed_width(tree: Tree, node: int, state: tuple[int, bool], children: int, widening: float,
                   max_width: int) -> int:
    generated, all_exhausted = state
    width = children + math.floor(widening * math.sqrt(float(tree.nodes["visits"][node])))
    if widening > 0 and all_exhausted:
        width = max(width, generated + 1)
    return min(width, max_width)


def widen_room(tree: Tree, node: int, *, children: int, widening: float, max_width: int) -> int:
    """How many more samples ``node`` may get now: ``allowed_width`` less the samples it has (at least 0)."""
    state = _children_state(tree, node)
    return max(_allowed_width(tree, node, state, children, widening, max_width) - state[0], 0)


def _all_exhausted(tree: Tree, node: int) -> bool:
    """``node`` has children and every one is exhausted."""
    exhausted, kids = tree.nodes["exhausted"], tree.children(node).tolist()
    return bool(kids) and all(exhausted[kid] for kid in kids)


def _exhausted(tree: Tree, node: int, can_widen: Callable[[int], bool]) -> bool:
    """A terminal node is exhausted once valued; an inner node when it waits for nothing, may get no other child,
    and all its children are exhausted."""
    n = tree.nodes
    if n["is_terminal"][node]:
        return bool(n["visits"][node] > 0)
    return not n["pending"][node] and _all_exhausted(tree, node) and not can_widen(node)


def refresh_exhausted(tree: Tree, node: int, can_widen: Callable[[int], bool]) -> None:
    """Recompute ``exhausted`` (``_exhausted``) from ``node`` up to the root."""
    n = tree.nodes
    while node != NO_PARENT:
        n["exhausted"][node] = _exhausted(tree, node, can_widen)
        node = int(n["parent"][node])


def refresh_all_exhausted(tree: Tree, can_widen: Callable[[int], bool]) -> None:
    """Recompute ``exhausted`` for every node (after the width cap rose): children before their parents, which
    node ids give for free (a child is created after its parent)."""
    for node in range(tree.num_nodes - 1, -1, -1):
        tree.nodes["exhausted"][node] = _exhausted(tree, node, can_widen)


def find_sibling(tree: Tree, parent: int, token_ids: np.ndarray) -> int | None:
    """A child of ``parent`` with exactly these tokens (an identical sample), or None."""
    starts, ends = tree.nodes["token_start"], tree.nodes["token_end"]
    for kid in tree.children(parent).tolist():
        if ends[kid] - starts[kid] == len(token_ids) and np.array_equal(tree.node_token_ids(kid), token_ids):
            return kid
    return None


def split_points(token_ids: np.ndarray, granularity: Granularity,
                 token_texts: Callable[[list[int]], list[str]]) -> list[int]:
    """Where a rollout's tokens split into steps: after the token that completes a step delimiter (counting only
    text after the previous cut), or after ``granularity.tokens`` tokens since it (``step``); every N tokens
    (``mini_step``). The end is not included. ``token_texts`` gives each token's own text; one string search per
    cut, not a Python loop over tokens."""
    count = len(token_ids)
    if granularity.kind != "step":
        return list(range(granularity.tokens, count, granularity.tokens))
    texts = token_texts(token_ids.tolist())
    ends = np.cumsum(list(map(len, texts)))  # char offset after each token
    joined, delimiter = "".join(texts), granularity.delimiter
    cuts, start_char, start_token = [], 0, 0
    while True:
        found = joined.find(delimiter, start_char)
        by_delimiter = int(np.searchsorted(ends, found + len(delimiter))) if found >= 0 else count
        last = min(by_delimiter, start_token + granularity.tokens - 1)  # the step's last token
        if last + 1 >= count:
            return cuts
        cuts.append(last + 1)
        start_char, start_token = int(ends[last]), last + 1


def slice_chunk(chunk: Chunk, start: int, end: int, finish: FinishReason) -> Chunk:
    confidences = None if chunk.confidences is None else chunk.confidences[start:end]
    return Chunk(chunk.token_ids[start:end], chunk.logprobs[start:end], chunk.top_ids[start:end],
                 chunk.top_logprobs[start:end], finish, chunk.num_cached_tokens, confidences)


TAG_OPENER = "<"
"""Every tag the search reads (``<Output>``, ``</Output>``, ``</Thought>``) starts with it, so text without it
holds none."""


class TagTokens:
    """Which token ids decode to text holding ``TAG_OPENER``, learnt one id at a time, so that a chunk none of whose
    tokens does is known to hold no tag without decoding it. Sound for any tokenizer whose text is its tokens' texts
    joined, byte pieces included: an ASCII character is never part of a multi-byte one. ``token_texts`` gives each
    token's own text (the search's per-token cache, which splitting rollouts into steps uses too)."""

    def __init__(self, token_texts: Callable[[list[int]], list[str]]):
        self.token_texts = token_texts
        self.known: set[int] = set()
        self.opens: set[int] = set()  # of those, the ids whose text holds TAG_OPENER

    def may_hold_tag(self, token_ids: list[int]) -> bool:
        if not self.known.issuperset(token_ids):  # set operations: no Python loop over a chunk's tokens
            new = list(set(token_ids).difference(self.known))
            self.opens.update(t for t, text in zip(new, self.token_texts(new), strict=True) if TAG_OPENER in text)
            self.known.update(new)
        return not self.opens.isdisjoint(token_ids)


def chunk_text(tree: Tree, parent: int, chunk_ids: np.ndarray, decode, tags: TagTokens | None = None) -> str:
    """The chunk decoded with a few tokens of its parent's path in front (to see tags split across chunks); with
    ``tags``, empty when none of those tokens can start a tag (the only thing the text is read for)."""
    ids = np.concatenate([tree.path_tail_ids(parent, TEXT_OVERLAP_TOKENS), chunk_ids]).tolist()
    if tags is not None and not tags.may_hold_tag(ids):
        return ""
    return decode(ids)


def ends_by_model(chunk: Chunk, text: str, eos_token_id: int) -> bool:
    """The model finished its answer: EOS, or the end of ``<Output>``."""
    if chunk.finish_reason == _EOS or len(chunk) == 0:
        return True
    return int(chunk.token_ids[-1]) == eos_token_id or OUTPUT_END in text


def holds_answer_tag(text: str) -> bool:
    """The text opens or closes an ``<Output>`` block (what a line's answer is read from)."""
    return OUTPUT_START in text or OUTPUT_END in text


def ends_thought(text: str, finished: bool) -> bool:
    """Where a reflection may go instead: the thought closes in this chunk, or the answer ends."""
    return finished or THOUGHT_END in text or OUTPUT_START in text


def wants_reflection(policy: ReflectionPolicy, *, confidence: float, answer: str | None,
                     reference: str | None) -> bool:
    """Whether a child that ends the thought earns a reflection sibling under ``policy``."""
    if policy.mode is ReflectionMode.OFF:
        return False
    if policy.mode is ReflectionMode.ALWAYS:
        return True
    if policy.mode is ReflectionMode.BELOW:
        return not confidence >= policy.threshold  # NaN (no generated tokens) counts as low
    if reference is None:
        raise ValueError("reflection=wrong_answer needs a reference answer for the problem")
    return answer is not None and not answers_match(answer, reference)


def reflections_on_path(tree: Tree, node: int) -> int:
    return int((tree.nodes["kind"][tree.path(node)] == _REFLECTION).sum())


def has_reflection_child(tree: Tree, node: int) -> bool:
    return bool((tree.nodes["kind"][tree.children(node)] == _REFLECTION).any())


def most_confident(tree: Tree, nodes: list[int]) -> int:
    """The first of ``nodes`` with the highest confidence (NaN counts as lowest); plain Python over a few nodes."""
    confidence, best, chosen = tree.nodes["confidence"], -math.inf, nodes[0]
    for node in nodes:
        value = float(confidence[node])
        if value > best:  # False for NaN
            best, chosen = value, node
    return chosen


def best_child(tree: Tree, node: int) -> int:
    """The most-visited child (ties: the higher mean value)."""
    kids = tree.children(node)
    visits = tree.nodes["visits"][kids].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        means = np.where(visits > 0, tree.nodes["value_sum"][kids] / visits, -np.inf)
    return int(kids[np.lexsort((means, visits))[-1]])


def most_visited_path(tree: Tree, start: int = ROOT) -> list[int]:
    """start..leaf, each step to the most-visited child (Marco-o1's final path)."""
    path = [start]
    while tree.nodes["num_children"][path[-1]] > 0:
        path.append(best_child(tree, path[-1]))
    return path


def best_root_value(tree: Tree) -> float:
    """The best mean value among the root's visited children (NaN when none is visited yet)."""
    kids = tree.children(ROOT)
    visits = tree.nodes["visits"][kids]
    if not (visits > 0).any():
        return float("nan")
    return float((tree.nodes["value_sum"][kids][visits > 0] / visits[visits > 0]).max())


def root_settled(tree: Tree, remaining_iterations: int) -> bool:
    """True when the root's most-visited child cannot be overtaken in the iterations left."""
    visits = np.sort(tree.nodes["visits"][tree.children(ROOT)])
    if len(visits) < 2:
        return False
    return int(visits[-1] - visits[-2]) > remaining_iterations

