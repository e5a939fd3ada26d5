"""Value labels from a build's trees: Monte-Carlo estimates per step end, outcomes per finished line."""

import numpy as np
import pytest

from dataset.value_labels import ValueDataError, read_value_examples, tree_examples
from tests.unit.handmade_build import NODES_OF_TREE, PROMPT, write_build


def test_each_finished_line_is_labelled_with_the_share_of_right_lines_below_each_step():
    examples = {tuple(e.token_ids[len(PROMPT):]): e for e in tree_examples("p1", PROMPT, NODES_OF_TREE, "5")}
    assert set(examples) == {(10, 11, 12, 13, 14), (10, 11, 15, 16), (17, 18, 19)}  # C is cut: no example
    a1, a2, b1 = examples[(10, 11, 12, 13, 14)], examples[(10, 11, 15, 16)], examples[(17, 18, 19)]
    assert list(a1.token_ids[:3]) == PROMPT and a1.token_ids.dtype == np.int32
    assert a1.positions.tolist() == [4, 7] and a1.labels.tolist() == [0.5, 1.0] and a1.correct
    assert a2.positions.tolist() == [4, 6] and a2.labels.tolist() == [0.5, 0.0] and not a2.correct
    assert b1.positions.tolist() == [3, 5] and b1.labels.tolist() == [0.0, 0.0] and not b1.correct
    assert {e.problem_id for e in examples.values()} == {"p1"}


def test_examples_are_read_from_a_build_output(tmp_path):
    write_build(tmp_path / "out", "5")
    examples = read_value_examples([str(tmp_path / "out")])
    assert len(examples) == 3 and sum(e.correct for e in examples) == 1


def test_outputs_without_trees_or_references_are_refused(tmp_path):
    with pytest.raises(ValueDataError, match="no build output"):
        read_value_examples([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueDataError, match="no committed trees"):
        read_value_examples([str(tmp_path / "empty")])
    write_build(tmp_path / "unlabelled", None)
    with pytest.raises(ValueDataError, match="1 of 1 trees have no reference answer"):
        read_value_examples([str(tmp_path / "unlabelled")])
