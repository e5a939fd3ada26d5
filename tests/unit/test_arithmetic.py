"""The bundled model's problem distribution: reproducible, right, and held-out seeds kept apart."""

import json

from deploy.cli import main
from modelkit.arithmetic import HELD_OUT_SEED_START, make_problems
from modelkit.train import DEV_SEED
from search.prompts import extract_answer, split_response


def test_problems_are_reproducible_and_solutions_are_right():
    first, again = make_problems(200, seed=5), make_problems(200, seed=5)
    assert first == again
    assert first != make_problems(200, seed=6)
    for p in first:
        reasoning, answer = split_response(p.solution)
        assert answer == p.answer == extract_answer(p.solution)
        steps = reasoning.split("\n\n")
        assert 3 <= len(steps) <= 2 + 4  # start, 1-4 changes, conclusion
        for step in steps[1:-1]:  # every worked step's arithmetic is correct
            lhs, rhs = step.split(" = ")
            a, op, b = lhs.split(", so ")[1].split()
            assert int(rhs.rstrip(".")) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert int(p.answer) >= 0


def test_held_out_seeds_are_never_training_seeds():
    assert DEV_SEED < HELD_OUT_SEED_START
    assert {p.id for p in make_problems(50, HELD_OUT_SEED_START)}.isdisjoint(p.id for p in make_problems(50, 0))


def test_make_problems_cli_writes_jsonl(tmp_path, capsys):
    out = tmp_path / "held-out.jsonl"
    assert main(["make-problems", "--n", "7", "--seed", str(HELD_OUT_SEED_START), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 7 and set(rows[0]) == {"id", "question", "answer"}
    assert main(["make-problems", "--n", "0", "--seed", "1", "--output", str(out)]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err
