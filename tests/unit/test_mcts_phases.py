"""The MCTS phases on hand-built trees whose answers can be worked out by hand."""

import math

import numpy as np
import pytest

from search import mcts
from search.params import FinalChoice, ReflectionMode, ReflectionPolicy
from search.protocol import ChunkBuilder, FinishReason
from search.tree import ROOT, NodeKind, Tree


def chunk(tokens, p=0.5, finish=FinishReason.LENGTH):
    b = ChunkBuilder()
    for t in tokens:
        b.add(t, math.log(p), [t, 1, 2, 3, 4], [math.log(p)] + [math.log((1 - p) / 4)] * 4)
    return b.build(finish)


def tree_with_children(visits, value_sums, root_visits=None):
    tree = Tree([1, 2, 3], max_children=len(visits) + 1)
    for i, (v, s) in enumerate(zip(visits, value_sums, strict=True)):
        node = tree.add_chunk(ROOT, chunk([10 + i]))
        tree.nodes["visits"][node], tree.nodes["value_sum"][node] = v, s
    tree.nodes["visits"][ROOT] = sum(visits) if root_visits is None else root_visits
    return tree


def test_uct_scores_by_hand():
    tree = tree_with_children([5, 3, 2], [3.0, 2.4, 0.6])
    c = 1.414
    expected = [3.0 / 5 + c * math.sqrt(math.log(10) / 5), 2.4 / 3 + c * math.sqrt(math.log(10) / 3),
                0.6 / 2 + c * math.sqrt(math.log(10) / 2)]
    assert mcts.uct_scores(tree, ROOT, c) == pytest.approx(expected)
    assert mcts.select(tree, c) == 2  # node ids: root 0, children 1..3; child 2 has the highest score
    assert tree.nodes["virtual_loss"][[ROOT, 2]].tolist() == [1, 1]
    fresh = tree_with_children([5, 3, 2], [3.0, 2.4, 0.6])
    assert mcts.select(fresh, 0.0) == 2  # pure exploitation: mean 0.8 beats 0.6 and 0.3


def test_unvisited_children_come_first():
    tree = tree_with_children([5, 0, 3], [4.5, 0.0, 2.9])
    assert mcts.select(tree, 1.414) == 2


def test_virtual_loss_spreads_concurrent_selections():
    tree = tree_with_children([0, 0, 0], [0.0, 0.0, 0.0])
    picked = []
    for _ in range(3):
        node = mcts.select(tree, 1.414)
        tree.nodes["pending"][node] = True  # the driver marks a leaf whose request is in flight
        picked.append(node)
    assert sorted(picked) == [1, 2, 3]
    assert mcts.select(tree, 1.414) is None  # every leaf is waiting for the engine
    assert tree.nodes["virtual_loss"][ROOT] == 3


def test_virtual_loss_lowers_an_in_flight_subtree_score():
    tree = tree_with_children([4, 4], [3.0, 2.9])
    grandchild = tree.add_chunk(1, chunk([20]))
    tree.nodes["visits"][grandchild], tree.nodes["value_sum"][grandchild] = 3, 2.2
    first = mcts.select(tree, 0.5)
    second = mcts.select(tree, 0.5)
    assert first == grandchild and second == 2  # without virtual loss both would go under node 1


def test_backup_adds_visits_and_values_and_removes_virtual_loss():
    tree = tree_with_children([1, 1], [0.5, 0.5])
    leaf = tree.add_chunk(1, chunk([20]))
    mcts.add_virtual_loss(tree, leaf, 1)
    mcts.backup(tree, leaf, 0.75)
    assert tree.nodes["visits"][[ROOT, 1, leaf]].tolist() == [3, 2, 1]
    assert tree.nodes["value_sum"][[ROOT, 1, leaf]].tolist() == pytest.approx([0.75, 1.25, 0.75])
    assert tree.nodes["virtual_loss"][:tree.num_nodes].tolist() == [0, 0, 0, 0]


def test_best_path_by_visits_or_by_value_and_completed_by_rollout():
    tree = tree_with_children([6, 4], [3.0, 3.6])
    assert mcts.best_path(tree, FinalChoice.MOST_VISITS) == [ROOT, 1]
    rollout = tree.add_chunk(2, chunk([30, 31]), kind=NodeKind.ROLLOUT)
    tree.nodes["value_sum"][rollout] = 0.9
    assert mcts.best_path(tree, FinalChoice.BEST_VALUE) == [ROOT, 2, rollout]


def test_tree_storage_is_columnar_and_paths_concatenate():
    tree = Tree([1, 2], max_children=2)
    a = tree.add_chunk(ROOT, chunk([5, 6]))
    b = tree.add_forced(a, [7, 8, 9])
    for _ in range(100):  # growth keeps earlier data
        tree.add_chunk(ROOT, chunk([1]), kind=NodeKind.ROLLOUT)
    assert tree.prompt_for(b).tolist() == [1, 2, 5, 6, 7, 8, 9]
    assert tree.path(b) == [ROOT, a, b]
    assert tree.children(ROOT).tolist() == [a]
    assert tree.nodes["confidence"][a] == pytest.approx(0.5)
    assert math.isnan(tree.nodes["confidence"][b])
    assert tree.generated_tokens == 2 + 100
    assert np.isnan(tree.tokens["logprobs"][tree.nodes["token_start"][b]])


@pytest.mark.parametrize("policy, confidence, answer, reference, expected", [
    ("off", 0.1, "3", "4", False),
    ("always", 0.9, "4", "4", True),
    ("below:0.5", 0.4, None, None, True),
    ("below:0.5", 0.6, None, None, False),
    ("below:0.5", float("nan"), None, None, True),
    ("wrong_answer", 0.9, "3", "4", True),
    ("wrong_answer", 0.9, "4.0", "4", False),
    ("wrong_answer", 0.9, None, "4", False),
])
def test_wants_reflection(policy, confidence, answer, reference, expected):
    got = mcts.wants_reflection(ReflectionPolicy.parse(policy), confidence=confidence, answer=answer,
                                reference=reference)
    assert got is expected


def test_wrong_answer_policy_needs_a_reference():
    with pytest.raises(ValueError, match="reference"):
        mcts.wants_reflection(ReflectionPolicy(ReflectionMode.WRONG_ANSWER), confidence=1, answer="1",
                              reference=None)


def test_root_settled():
    tree = tree_with_children([10, 3], [5.0, 1.0])
    assert mcts.root_settled(tree, remaining_iterations=6)
    assert not mcts.root_settled(tree, remaining_iterations=7)
