"""Value labels from a build's trees: Monte-Carlo estimates per step end, outcomes per finished line."""

import numpy as np
import pytest

from dataset.value_labels import ValueDataError, read_value_examples, tree_examples
from search.params import StepCheck
from tests.unit.handmade_build import NODES_OF_TREE, PROMPT, node, write_build


def test_each_finished_line_is_labelled_with_the_share_of_right_lines_below_each_step():
    examples = {tuple(e.token_ids[len(PROMPT):]): e for e in tree_examples("p1", PROMPT, NODES_OF_TREE, "5")}
    assert set(examples) == {(10, 11, 12, 13, 14), (10, 11, 15, 16), (17, 18, 19)}  # C is cut: no example
    a1, a2, b1 = examples[(10, 11, 12, 13, 14)], examples[(10, 11, 15, 16)], examples[(17, 18, 19)]
    assert list(a1.token_ids[:3]) == PROMPT and a1.token_ids.dtype == np.int32
    assert a1.positions.tolist() == [4, 7] and a1.labels.tolist() == [0.5, 1.0] and a1.correct
    assert a2.positions.tolist() == [4, 6] and a2.labels.tolist() == [0.5, 0.0] and not a2.correct
    assert b1.positions.tolist() == [3, 5] and b1.labels.tolist() == [0.0, 0.0] and not b1.correct
    assert {e.problem_id for e in examples.values()} == {"p1"}


# root -> A (a false sum) -> A1: answers 5 (right); root -> B (a true sum) -> {B1: answers 5 (right), B2: answers 6}
CHECKED_TREE = [
    node(0, -1, [], ""),
    node(1, 0, [10, 11], "<Thought>\n2 + 2 = 5\n\n"),
    node(2, 1, [12, 13], "</Thought>\n<Output>\n5\n</Output>", terminal=True),
    node(3, 0, [14, 15], "<Thought>\n2 + 3 = 5\n\n"),
    node(4, 3, [16, 17], "</Thought>\n<Output>\n5\n</Output>", terminal=True),
    node(5, 3, [18, 19], "</Thought>\n<Output>\n6\n</Output>", terminal=True),
]


def test_with_a_step_check_a_false_step_and_every_step_after_it_are_labelled_wrong():
    def labels(check):
        return {tuple(e.token_ids[len(PROMPT):]): (e.labels.tolist(), e.correct)
                for e in tree_examples("p1", PROMPT, CHECKED_TREE, "5", check)}

    assert labels(StepCheck.OFF) == {(10, 11, 12, 13): ([1.0, 1.0], True), (14, 15, 16, 17): ([0.5, 1.0], True),
                                     (14, 15, 18, 19): ([0.5, 0.0], False)}
    # the line through the false sum still reaches the right answer (``correct``), but teaches nothing right
    assert labels(StepCheck.ARITHMETIC) == {(10, 11, 12, 13): ([0.0, 0.0], True),
                                            (14, 15, 16, 17): ([0.5, 1.0], True),
                                            (14, 15, 18, 19): ([0.5, 0.0], False)}


def test_examples_are_read_from_a_build_output(tmp_path):
    write_build(tmp_path / "out", "5")
    examples = read_value_examples([str(tmp_path / "out")])
    assert len(examples) == 3 and sum(e.correct for e in examples) == 1
    write_build(tmp_path / "checked", "5", nodes={"p1": CHECKED_TREE})
    checked = read_value_examples([str(tmp_path / "checked")], check=StepCheck.ARITHMETIC)
    assert sorted(e.labels.tolist()[0] for e in checked) == [0.0, 0.5, 0.5]


def test_outputs_without_trees_or_references_are_refused(tmp_path):
    with pytest.raises(ValueDataError, match="no build output"):
        read_value_examples([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueDataError, match="no committed trees"):
        read_value_examples([str(tmp_path / "empty")])
    write_build(tmp_path / "unlabelled", None)
    with pytest.raises(ValueDataError, match="1 of 1 trees have no reference answer"):
        read_value_examples([str(tmp_path / "unlabelled")])
