"""The MCTS phases on hand-built trees whose answers can be worked out by hand."""

import math

import numpy as np
import pytest

from search import mcts
from search.params import ReflectionMode, ReflectionPolicy
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


def test_most_visited_path_descends_by_visits_then_value():
    tree = tree_with_children([6, 4], [3.0, 3.6])
    assert mcts.most_visited_path(tree) == [ROOT, 1]
    tie = tree_with_children([4, 4], [2.0, 3.6])
    assert mcts.most_visited_path(tie) == [ROOT, 2]


def test_tree_storage_is_columnar_and_paths_concatenate():
    tree = Tree([1, 2], max_children=2)
    a = tree.add_chunk(ROOT, chunk([5, 6]))
    b = tree.add_forced(a, [7, 8, 9])
    step = tree.add_chunk(ROOT, chunk([1]), kind=NodeKind.ROLLOUT)
    for _ in range(99):  # growth keeps earlier data
        step = tree.add_chunk(step, chunk([1]), kind=NodeKind.ROLLOUT)
    assert tree.prompt_for(b).tolist() == [1, 2, 5, 6, 7, 8, 9]
    assert tree.path(b) == [ROOT, a, b]
    assert tree.children(ROOT).tolist() == [a, b + 1]  # a rollout's step is a child like any other
    assert tree.nodes["depth"][step] == 100
    assert tree.nodes["confidence"][a] == pytest.approx(0.5)
    assert math.isnan(tree.nodes["confidence"][b])
    assert tree.generated_tokens == 2 + 100
    assert np.isnan(tree.tokens["logprobs"][tree.nodes["token_start"][b]])


def test_a_shrunk_tree_holds_no_spare_rows_and_can_still_grow():
    tree = Tree([1, 2], max_children=2)
    a = tree.add_chunk(ROOT, chunk([5, 6]))
    before = {name: column[:tree.num_tokens].copy() for name, column in tree.tokens.items()}
    tree.shrink_to_fit()
    assert {len(c) for c in tree.nodes.values()} == {2} and {len(c) for c in tree.tokens.values()} == {2}
    assert all(np.array_equal(tree.tokens[k], v, equal_nan=True) for k, v in before.items())
    b = tree.add_chunk(a, chunk([7]))
    assert tree.prompt_for(b).tolist() == [1, 2, 5, 6, 7] and tree.path(b) == [ROOT, a, b]


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


def test_a_valued_terminal_leaf_is_never_selected_again():
    """Before: a finished leaf was the only choice while its sibling waited on the engine, and collected free
    visits. Now it is exhausted, and selection waits."""
    tree = tree_with_children([1, 0], [0.9, 0.0])
    tree.nodes["is_terminal"][1] = True
    mcts.refresh_exhausted(tree, 1, can_widen=lambda node: False)
    tree.nodes["pending"][2] = True  # its rollout is in flight
    assert tree.nodes["exhausted"][1] and not tree.nodes["exhausted"][ROOT]
    assert mcts.select(tree, 1.414) is None
    tree.nodes["pending"][2] = False
    tree.nodes["is_terminal"][2] = True
    tree.nodes["visits"][2] = 1
    mcts.refresh_exhausted(tree, 2, can_widen=lambda node: False)
    assert tree.nodes["exhausted"][ROOT]  # nothing left to expand: the search stops as EXHAUSTED
    assert mcts.select(tree, 1.414) is None


def test_normalised_values_let_uct_tell_close_lines_apart():
    """Confidence values of 0.95 and 0.97 differ by 0.02 against an exploration term near 1: raw, the less
    visited (worse) child wins; normalised over the tree's values, the better one does."""
    tree = tree_with_children([10, 4], [9.7, 3.8])  # means 0.97 and 0.95
    c = 0.5
    raw = mcts.uct_scores(tree, ROOT, c)
    assert raw[1] > raw[0]
    bounds = (0.95, 0.97)
    scores = mcts.uct_scores(tree, ROOT, c, bounds)
    log_n = math.log(14)
    assert scores == pytest.approx([1.0 + c * math.sqrt(log_n / 10), 0.0 + c * math.sqrt(log_n / 4)])
    assert mcts.select(tree, c, bounds=bounds) == 1


def test_widening_allows_more_children_with_visits_and_after_every_child_failed():
    tree = tree_with_children([4, 5], [1.0, 1.0], root_visits=16)
    assert mcts.allowed_width(tree, ROOT, children=2, widening=0.0, max_width=4) == 2
    assert mcts.allowed_width(tree, ROOT, children=2, widening=0.5, max_width=4) == 4  # 2 + floor(0.5 * 4)
    assert mcts.allowed_width(tree, ROOT, children=2, widening=0.5, max_width=3) == 3
    tree.nodes["exhausted"][[1, 2]] = True
    few = tree_with_children([1, 1], [0.0, 0.0], root_visits=2)
    few.nodes["exhausted"][[1, 2]] = True
    assert mcts.allowed_width(few, ROOT, children=2, widening=0.1, max_width=4) == 3  # retry a failed step
    assert mcts.allowed_width(few, ROOT, children=2, widening=0.0, max_width=4) == 2


def test_widen_room_counts_merged_samples_and_not_a_reflection_child():
    tree = tree_with_children([4, 5], [1.0, 1.0], root_visits=16)
    assert mcts.widen_room(tree, ROOT, children=2, widening=0.5, max_width=4) == 2  # width 4, two samples
    assert mcts.widen_room(tree, ROOT, children=2, widening=0.0, max_width=4) == 0
    tree.nodes["weight"][1] = 2  # a repeated sample merged into child 1 used up a try
    assert mcts.widen_room(tree, ROOT, children=2, widening=0.5, max_width=4) == 1
    tree.nodes["kind"][2] = NodeKind.REFLECTION  # forced text: not a sample
    assert mcts.widen_room(tree, ROOT, children=2, widening=0.5, max_width=4) == 2


def test_identical_samples_are_found_among_siblings():
    tree = tree_with_children([1, 1], [0.5, 0.5])
    assert mcts.find_sibling(tree, ROOT, np.array([11], dtype=np.int32)) == 2
    assert mcts.find_sibling(tree, ROOT, np.array([11, 12], dtype=np.int32)) is None


def test_a_rollout_splits_into_steps():
    from search.params import Granularity

    vocab = {1: "a", 2: "\n", 3: "\n\n", 4: "b"}
    decode = lambda ids: [vocab[t] for t in ids]  # noqa: E731
    tokens = np.array([1, 3, 4, 2, 2, 1, 4], dtype=np.int32)
    assert mcts.split_points(tokens, Granularity("step", 256), decode) == [2, 5]  # "\n" + "\n" spans two tokens
    assert mcts.split_points(tokens, Granularity("step", 2), decode) == [2, 4, 6]  # at most 2 tokens a step
    assert mcts.split_points(tokens, Granularity("mini_step", 3), decode) == [3, 6]


def _lines_tree():
    """Three finished lines under the root: answers 7 (value 0.9), 8 (0.6) and 8 (0.5); the 0.5 line has the
    most visits."""
    tree = tree_with_children([1, 1, 3], [0.9, 0.6, 1.5])
    tree.nodes["is_terminal"][1:4] = True
    tree.nodes["finish_reason"][1:4] = FinishReason.EOS
    return tree, {10: "<Output>7</Output>", 11: "<Output>8</Output>", 12: "<Output>8.0</Output>"}


@pytest.mark.parametrize("rule, leaf", [("vote", 2), ("best_value", 1), ("most_visits", 3)])
def test_final_answer_rules_over_every_finished_line(rule, leaf):
    from search import final
    from search.params import FinalChoice

    tree, texts = _lines_tree()
    lines = final.finished_lines(tree, lambda ids: "".join(texts[i] for i in ids))
    assert [line.key for line in lines] == ["7", "8", "8"]
    # vote: 8 has 0.6 + 0.5 > 0.9, and its best-valued line is node 2
    assert final.choose(tree, lines, FinalChoice(rule)).leaf == leaf


def _split_points_token_by_token(token_ids, granularity, decode_token):
    """The straightforward per-token loop ``split_points`` replaced; kept as the reference it must agree with."""
    cuts, tail, since = [], "", 0
    keep = len(granularity.delimiter) - 1
    for i, token in enumerate(token_ids.tolist()):
        tail += decode_token(token)
        since += 1
        if granularity.delimiter in tail or since >= granularity.tokens:
            if i + 1 < len(token_ids):
                cuts.append(i + 1)
            tail, since = "", 0
        else:
            tail = tail[-keep:] if keep else ""
    return cuts


@pytest.mark.parametrize("max_step_tokens", [256, 5, 3, 1])
def test_split_points_agrees_with_the_token_by_token_reference(max_step_tokens):
    from search.params import Granularity
    from search.simulated import SimulatedTokenizer

    tok = SimulatedTokenizer()
    granularity = Granularity.parse("step", max_step_tokens=max_step_tokens)
    # delimiters whole, split across tokens, overlapping ("\n\n\n"), at the start and at the end
    pieces = ["\n", "\n\n", " w1", "a", "b", "\n", "x"]
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = np.asarray([tok.ids[pieces[i]] for i in rng.integers(0, len(pieces), rng.integers(0, 30))],
                         dtype=np.int32)
        texts = lambda tokens: [tok.vocab[t] for t in tokens]  # noqa: E731
        assert mcts.split_points(ids, granularity, texts) == _split_points_token_by_token(
            ids, granularity, tok.vocab.__getitem__)


def test_path_tail_ids_from_one_node_equals_the_walk_over_the_path():
    tree = Tree([1, 2, 3], max_children=2)
    a = tree.add_chunk(ROOT, chunk([10, 11, 12]))
    b = tree.add_chunk(a, chunk([20, 21, 22, 23, 24, 25, 26, 27, 28, 29]))
    c = tree.add_chunk(b, chunk([30, 31]))
    assert tree.path_tail_ids(b, 8).tolist() == [22, 23, 24, 25, 26, 27, 28, 29]  # b's own tokens suffice
    assert tree.path_tail_ids(c, 8).tolist() == [24, 25, 26, 27, 28, 29, 30, 31]  # across b and c
    assert tree.path_tail_ids(a, 8).tolist() == [10, 11, 12]  # the path is shorter
    assert tree.path_tail_ids(ROOT, 8).tolist() == [] and tree.path_tail_ids(b, 0).tolist() == []


class CountingTokenizer:
    """Two-character tokens: id i is the i-th entry of ``vocab``; counts decode calls of more than one token."""

    vocab = ["ab", "cd", "<O", "ut", "pu", "t>", "ef"]

    def __init__(self):
        self.long_decodes = 0

    def decode(self, ids):
        self.long_decodes += len(ids) > 1
        return "".join(self.vocab[i] for i in ids)


def test_a_chunk_without_a_tag_opener_is_not_decoded_and_one_split_across_chunks_is_still_read():
    tokenizer = CountingTokenizer()
    tags = mcts.TagTokens(lambda ids: [tokenizer.decode([i]) for i in ids])
    tree = Tree([1], max_children=2)
    plain = tree.add_chunk(ROOT, chunk([0, 1, 6, 0]))
    assert mcts.chunk_text(tree, plain, np.array([1, 6], np.int32), tokenizer.decode, tags) == ""
    assert tokenizer.long_decodes == 0  # only single tokens were decoded, once each
    opened = tree.add_chunk(plain, chunk([0, 2]))  # "<O" closes this chunk; "utput>" comes in the next
    text = mcts.chunk_text(tree, opened, np.array([3, 4, 5], np.int32), tokenizer.decode, tags)
    assert "<Output>" in text and mcts.holds_answer_tag(text) and tokenizer.long_decodes == 1
    without = mcts.chunk_text(tree, opened, np.array([3, 4, 5], np.int32), tokenizer.decode)
    assert without == text  # the filter never changes a text it lets through
