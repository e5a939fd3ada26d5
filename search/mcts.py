"""The MCTS phases as small functions over a ``Tree`` (no I/O, no engine).

Engine calls are asynchronous, so a phase that needs the model stops at a request and a separate
function applies the result (``search.driver`` makes the call in between):

1. ``select``: descend from the root by UCT until a node without children, adding virtual loss on the way.
2. ``expand``: the engine samples ``k`` chunks from the leaf (one request, ``n=k``); ``apply_expansion``
   adds them as children (plus a reflection child where the policy asks for one).
3. ``simulate``: the engine continues a new child to a terminal state; its value comes from a value function.
4. ``backup``: visits and value sums along the path; the virtual loss is removed.
5. ``best_path``: the answer the search settles on.
"""

from __future__ import annotations

import math

import numpy as np

from search.params import FinalChoice, ReflectionMode, ReflectionPolicy
from search.prompts import OUTPUT_END, OUTPUT_START, THOUGHT_END, answers_match
from search.protocol import Chunk, FinishReason
from search.tree import ROOT, NodeKind, Tree

TEXT_OVERLAP_TOKENS = 8
"""Tokens of the parent's path decoded with a chunk, so a tag split across two chunks is still seen."""


def uct_scores(tree: Tree, node: int, exploration: float) -> np.ndarray:
    """UCT score per child of ``node``: Q + c * sqrt(ln N_parent / N_child).

    Virtual loss counts as visits with value 0, so in-flight paths look worse and concurrent selections
    spread out. Unvisited children (no visits, none in flight) score +inf: they are tried first.
    A child that is a leaf with a request in flight scores -inf: nothing can be done there until it returns.
    Plain Python over the few children: numpy's per-call overhead would dominate (see ``forest bench manager``).
    """
    n = tree.nodes
    visits, virtual, value_sum = n["visits"], n["virtual_loss"], n["value_sum"]
    pending, num_children = n["pending"], n["num_children"]
    log_parent = math.log(max(float(visits[node] + virtual[node]), 1.0))
    scores = []
    for kid in tree.children(node).tolist():
        count = float(visits[kid] + virtual[kid])
        if pending[kid] and num_children[kid] == 0:
            scores.append(-math.inf)
        elif count > 0:
            scores.append(float(value_sum[kid]) / count + exploration * math.sqrt(log_parent / count))
        else:
            scores.append(math.inf)
    return np.array(scores, dtype=np.float64)


def add_virtual_loss(tree: Tree, node: int, amount: int) -> None:
    for i in tree.path(node):
        tree.nodes["virtual_loss"][i] += amount


def select(tree: Tree, exploration: float) -> int | None:
    """Descend from the root to a node without children, adding one virtual loss along the path.

    Returns None (and changes nothing) when every way down ends at a leaf that is waiting for the engine.
    """
    node = ROOT
    if tree.nodes["pending"][ROOT] and tree.nodes["num_children"][ROOT] == 0:
        return None
    while tree.nodes["num_children"][node] > 0:
        scores = uct_scores(tree, node, exploration)
        best = int(np.argmax(scores))
        if scores[best] == -np.inf:
            return None
        node = int(tree.children(node)[best])
    add_virtual_loss(tree, node, 1)
    return node


def backup(tree: Tree, node: int, value: float) -> None:
    """Add one visit and ``value`` on the path root..node, removing the virtual loss ``select`` added."""
    for i in tree.path(node):
        tree.nodes["visits"][i] += 1
        tree.nodes["value_sum"][i] += value
        tree.nodes["virtual_loss"][i] -= 1


def chunk_text(tree: Tree, parent: int, chunk_ids: np.ndarray, decode) -> str:
    """The chunk decoded with a few tokens of its parent's path in front (to see tags split across chunks)."""
    tail = tree.path_token_ids(parent)[-TEXT_OVERLAP_TOKENS:]
    return decode(np.concatenate([tail, chunk_ids]).tolist())


def ends_by_model(chunk: Chunk, text: str, eos_token_id: int) -> bool:
    """The model finished its answer: EOS, or the end of ``<Output>``."""
    if chunk.finish_reason == FinishReason.EOS or len(chunk) == 0:
        return True
    return int(chunk.token_ids[-1]) == eos_token_id or OUTPUT_END in text


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
    return sum(int(tree.nodes["kind"][i] == NodeKind.REFLECTION) for i in tree.path(node))


def has_reflection_child(tree: Tree, node: int) -> bool:
    return bool((tree.nodes["kind"][tree.children(node)] == NodeKind.REFLECTION).any())


def best_child(tree: Tree, node: int, final: FinalChoice) -> int:
    """Most visits (ties: higher mean value), or best mean value among visited children."""
    kids = tree.children(node)
    visits = tree.nodes["visits"][kids].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        means = np.where(visits > 0, tree.nodes["value_sum"][kids] / visits, -np.inf)
    if final is FinalChoice.BEST_VALUE and (visits > 0).any():
        order = np.lexsort((visits, means))
    else:
        order = np.lexsort((means, visits))
    return int(kids[order[-1]])


def best_path(tree: Tree, final: FinalChoice, start: int = ROOT) -> list[int]:
    """start..leaf by ``final``; a non-terminal leaf is completed with its best rollout, when it has one."""
    path = [start]
    while tree.nodes["num_children"][path[-1]] > 0:
        path.append(best_child(tree, path[-1], final))
    leaf = path[-1]
    rollouts = tree.rollouts(leaf)
    if not tree.nodes["is_terminal"][leaf] and len(rollouts):
        path.append(int(rollouts[np.argmax(tree.nodes["value_sum"][rollouts])]))
    return path


def best_root_value(tree: Tree) -> float:
    """The best mean value among the root's visited children (NaN when none is visited yet)."""
    kids = tree.children(ROOT)
    visits = tree.nodes["visits"][kids]
    if not (visits > 0).any():
        return float("nan")
    return float((tree.nodes["value_sum"][kids][visits > 0] / visits[visits > 0]).max())


def fully_explored(tree: Tree) -> bool:
    """Every leaf of the searchable tree is terminal (so no expansion is possible anywhere)."""
    n = tree.num_nodes
    leaves = (tree.nodes["num_children"][:n] == 0) & (tree.nodes["kind"][:n] != NodeKind.ROLLOUT)
    return bool(tree.nodes["is_terminal"][:n][leaves].all())


def root_settled(tree: Tree, remaining_iterations: int) -> bool:
    """True when the root's most-visited child cannot be overtaken in the iterations left."""
    visits = np.sort(tree.nodes["visits"][tree.children(ROOT)])
    if len(visits) < 2:
        return False
    return int(visits[-1] - visits[-2]) > remaining_iterations

