"""Multi-step arithmetic word problems with worked solutions in Marco-o1's format.

The bundled model (``modelkit/train.py``) is trained on this distribution and ``forest make-problems`` samples it.
One seed gives one reproducible stream of problems; training uses seeds below ``HELD_OUT_SEED_START`` and every
held-out set uses seeds at or above it, so evaluation problems never come from a training stream.

A problem starts a person with 10-59 items and applies 1-4 changes of 2-9 items (buy, find, give away, lose...): single-
digit carries and borrows, whose mistakes compound over the steps. Each change is one
``<Thought>`` step (steps are separated by blank lines, Marco-o1's step delimiter), then ``<Output>`` holds the count.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_SEED_START = 1_000_000

NAMES = ["Ann", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lou", "Max", "Ned", "Oli", "Pam"]
ITEMS = ["apples", "books", "coins", "pens", "cards", "eggs", "shells", "stamps", "marbles", "cookies"]
GAINS = ["buys {n} more", "finds {n} more", "gets {n} more from a friend", "wins {n} more"]
LOSSES = ["gives away {n}", "loses {n}", "sells {n}", "eats {n}"]
MAX_CHANGES = 4


@dataclass(frozen=True, slots=True)
class ArithmeticProblem:
    id: str
    question: str
    answer: str
    solution: str  # the assistant's response: <Thought> steps, then <Output>

    def row(self) -> dict:
        return {"id": self.id, "question": self.question, "answer": self.answer}


def make_problem(rng: random.Random, problem_id: str) -> ArithmeticProblem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(10, 59)
    sentences = [f"{name} has {total} {item}."]
    steps = [f"{name} starts with {total} {item}."]
    for _ in range(rng.randint(1, MAX_CHANGES)):
        if total > 10 and rng.random() < 0.5:
            n = rng.randint(2, 9)
            sentences.append(f"Then {name} {rng.choice(LOSSES).format(n=n)}.")
            steps.append(f"{name} loses {n}, so {total} - {n} = {total - n}.")
            total -= n
        else:
            n = rng.randint(2, 9)
            sentences.append(f"Then {name} {rng.choice(GAINS).format(n=n)}.")
            steps.append(f"{name} gains {n}, so {total} + {n} = {total + n}.")
            total += n
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    steps.append(f"So {name} has {total} {item}.")
    solution = "<Thought>\n" + "\n\n".join(steps) + "\n</Thought>\n<Output>\n" + f"{total}\n</Output>"
    return ArithmeticProblem(problem_id, question, str(total), solution)


def make_problems(n: int, seed: int) -> list[ArithmeticProblem]:
    """``n`` problems from one seeded stream; ids carry the seed so sets from different seeds never collide."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [make_problem(rng, f"arith-{seed}-{i}") for i in range(n)]


def write_problems(path: str | Path, n: int, seed: int) -> Path:
    """Write ``n`` problems as JSONL rows of id, question, answer (the format ``forest build``/``eval`` read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for problem in make_problems(n, seed):
            f.write(json.dumps(problem.row()) + "\n")
    return path
