"""Value-model training (``modelkit.value``) on a toy task, from a tiny random policy."""

import json

import pytest

from modelkit.make_model import make_tiny_random
from modelkit.value import REPORT, split_by_problem, train_value
from tests.toy_value import toy_lines


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_random(tmp_path_factory.mktemp("policy") / "tiny", seed=0, hidden_size=64)


def test_a_tiny_value_model_learns_a_separable_task(base, tmp_path):
    lines = toy_lines(160, seed=0)
    report = train_value(lines, base=base, output=tmp_path / "value", epochs=10, batch_size=16, lr=3e-3,
                         eval_every=8, patience=10, dev_share=0.25, progress=False)
    history = report["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert report["line_auroc"] >= 0.95 and report["dev_problems"] == 40 and report["train_problems"] == 120
    written = json.loads((tmp_path / "value" / "config.json").read_text())
    assert written["architectures"] == ["Qwen2ForTokenClassification"] and written["id2label"]["1"] == "right"
    assert (tmp_path / "value" / "tokenizer.json").is_file() and (tmp_path / "value" / REPORT).is_file()


def test_the_dev_split_holds_whole_problems_out():
    lines = toy_lines(20, seed=1) + toy_lines(20, seed=2)  # every problem id twice
    train, dev = split_by_problem(lines, 0.25, seed=3)
    assert {e.problem_id for e in train}.isdisjoint({e.problem_id for e in dev})
    assert len(dev) == 10 and len(train) == 30


def test_bad_inputs_are_refused(base, tmp_path):
    with pytest.raises(ValueError, match="no labelled lines"):
        train_value([], base=base, output=tmp_path / "v")
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        train_value(toy_lines(4, 0), base=tmp_path / "missing", output=tmp_path / "v")
