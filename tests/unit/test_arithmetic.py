"""The bundled model's problem distribution: reproducible, right, held-out seeds kept apart, and reflection
examples whose slip stays out of the loss."""

import json
import random
import re

import pytest

from deploy.cli import main
from modelkit.arithmetic import (HELD_OUT_SEED_START, MAX_CHANGES, MAX_COUNT, MIN_CHANGES, _change, make_problems,
                                 make_training_example)
from modelkit.train import DEV_SEED
from search.prompts import REFLECTION_PHRASE, extract_answer, split_response

STEP = re.compile(r", so (\d+) ([-+×÷]) (\d+) = (\d+)(?: remainder (\d+), which leaves (\d+))?\.$")


def _check_step(step: str, count: int) -> int:
    """The count after a worked change step, checking its arithmetic (and a bag product, when there is one)."""
    start, op, operand, result, remainder, left = STEP.search(step).groups()
    assert int(start) == count
    a, b, r = int(start), int(operand), int(result)
    if op == "÷":
        assert (r, int(remainder)) == divmod(a, b) and int(left) == r
    else:
        assert r == {"+": a + b, "-": a - b, "×": a * b}[op]
    bags = re.search(r"gains (\d+) × (\d+) = (\d+), so", step)
    if bags:
        assert int(bags[1]) * int(bags[2]) == int(bags[3]) == b
    return r


def test_problems_are_reproducible_and_solutions_are_right():
    first, again = make_problems(300, seed=5), make_problems(300, seed=5)
    assert first == again
    assert first != make_problems(300, seed=6)
    kinds = set()
    for p in first:
        reasoning, answer = split_response(p.solution)
        assert answer == p.answer == extract_answer(p.solution)
        steps = reasoning.split("\n\n")
        assert len(steps) == p.changes + 2 and MIN_CHANGES <= p.changes <= MAX_CHANGES
        count = int(steps[0].split()[3])
        for step in steps[1:-1]:  # every worked step's arithmetic is right and starts where the last ended
            count = _check_step(step, count)
            assert 0 <= count <= MAX_COUNT
            kinds.add("bags" if " × " in step.split(", so")[0] else STEP.search(step)[2])
        assert str(count) == p.answer
    assert kinds == {"+", "-", "×", "÷", "bags"}, "every kind of change appears"
    assert sum(len(p.question.split(". ")) > p.changes + 2 for p in first) > 50, "distractor sentences appear"


def test_reflection_examples_slip_once_then_redo_right():
    rng = random.Random(3)
    problems = make_problems(200, seed=9)
    examples = [make_training_example(rng, p, reflection_rate=1.0) for p in problems]
    for p, ex in zip(problems, examples, strict=True):
        reasoning, answer = split_response(ex.response)
        assert answer == p.answer
        first, _, redo = reasoning.partition("\n\n" + REFLECTION_PHRASE + "\n\n")
        assert redo.split("\n\n") == list(p.steps), "the redo is the correct solution from scratch"
        (start, end), = ex.unscored
        slip = ex.response[start:end]
        assert slip in first.split("\n\n") and slip not in p.steps, "the unscored span is the wrong step"
        wrong = first.split("\n\n")
        assert len(wrong) == p.changes + 1  # the start and every change, no conclusion
    plain = [make_training_example(rng, p, reflection_rate=0.0) for p in problems]
    assert [ex.response for ex in plain] == [p.solution for p in problems]
    assert all(ex.unscored == () for ex in plain)


def test_training_labels_leave_the_slip_out(tmp_path):
    from modelkit.make_model import train_tokenizer
    from modelkit.train import IGNORE, _batch

    problem = make_problems(1, seed=4)[0]
    example = make_training_example(random.Random(0), problem, reflection_rate=1.0)
    tokenizer = train_tokenizer(tmp_path, [example.response] * 20, vocab_size=300, split_digits=True)
    ids, mask, target = _batch(tokenizer, [(problem.question, example)], "cpu")
    scored = tokenizer.decode([int(t) for t in target[0] if t != IGNORE])
    (start, end), = example.unscored
    slip = example.response[start:end]
    assert slip not in scored and scored.startswith("<Thought>") and REFLECTION_PHRASE in scored
    assert int(mask.sum()) == ids.shape[1]


def test_held_out_seeds_are_never_training_seeds():
    assert DEV_SEED < HELD_OUT_SEED_START
    assert {p.id for p in make_problems(50, HELD_OUT_SEED_START)}.isdisjoint(p.id for p in make_problems(50, 0))


def test_make_problems_cli_writes_jsonl(tmp_path, capsys):
    out = tmp_path / "held-out.jsonl"
    assert main(["make-problems", "--n", "7", "--seed", str(HELD_OUT_SEED_START), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 7 and set(rows[0]) == {"id", "question", "answer", "changes"}
    assert main(["make-problems", "--n", "0", "--seed", "1", "--output", str(out)]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("total", [10, 12, 499, 500, 981, 995, 996, 997, 998, 999])
def test_every_change_keeps_the_count_in_range(total):
    """Near the largest count only the changes that fit are drawn (no empty ranges, no count above it)."""
    rng = random.Random(total)
    for _ in range(300):
        _, step, after = _change(rng, "Ann", "pens", total)
        assert 0 <= after <= MAX_COUNT and _check_step(step, total) == after


def test_training_keeps_the_best_weights_and_resumes(tmp_path):
    """A tiny run: every evaluation recorded, the best dev loss kept; a resumed run continues the history."""
    from modelkit.train import train

    settings = dict(hidden_size=64, layers=1, batch_size=4, eval_every=1, dev_problems=4, threads=1)
    first = train(tmp_path, max_steps=2, **settings)
    assert [h["step"] for h in first["history"]] == [1, 2] and first["stopped"] == "max_steps"
    best = min(first["history"], key=lambda h: h["dev_loss"])
    assert (first["steps"], first["dev_loss"]) == (best["step"], best["dev_loss"])
    assert json.loads((tmp_path / "training.json").read_text())["steps"] == first["steps"]
    again = train(tmp_path, max_steps=3, resume=True, **settings)
    assert again["resumed"] == [first["steps"]]
    assert [h["step"] for h in again["history"]][-1] == 3
