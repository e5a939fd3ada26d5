"""Multi-step arithmetic word problems with worked solutions in Marco-o1's format.

The bundled model (``modelkit/train.py``) is trained on this distribution and ``forest make-problems`` samples it.
One seed gives one reproducible stream of problems; training uses seeds below ``HELD_OUT_SEED_START`` and every
held-out set uses seeds at or above it, so evaluation problems never come from a training stream.

The distribution (what ``forest make-problems`` writes):

- a person starts with 10-199 items; then 1-5 changes follow (uniformly many), each one ``<Thought>`` step:
  gaining or losing 2-99 items, buying 2-9 bags of 2-12 (a product, then a sum, in one step), doubling or tripling
  (while the count stays below 1,000), and splitting into 2-9 equal piles and keeping one (division with a remainder);
- 0-2 distractor sentences (another person's count, an age, a price) that the solution never uses;
- steps are separated by blank lines (Marco-o1's step delimiter); ``<Output>`` holds the final count.

Difficulty comes from the problems: multi-digit carries, products and remainders computed in one step, and mistakes
that compound over the steps, so longer problems are harder for a model of any size.

``make_training_example`` can add Marco-o1-style reflection: the worked steps make one plausible mistake (a wrong
digit or a dropped carry) and carry it forward, then the reflection phrase starts the solution again from scratch,
correctly. The mistaken step is marked so that training can leave it out of the loss (the model learns to notice
and redo, not to make the mistake).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from search.prompts import REFLECTION_PHRASE

HELD_OUT_SEED_START = 1_000_000

NAMES = ["Ann", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lou", "Max", "Ned", "Oli", "Pam"]
ITEMS = ["apples", "books", "coins", "pens", "cards", "eggs", "shells", "stamps", "marbles", "cookies"]
GAINS = ["buys {n} more", "finds {n} more", "gets {n} more from a friend", "wins {n} more"]
LOSSES = ["gives away {n}", "loses {n}", "sells {n}", "eats {n}"]
MIN_CHANGES, MAX_CHANGES = 1, 5
MAX_DISTRACTORS = 2
MAX_COUNT = 999  # a count never exceeds three digits
MIN_GAIN = 2  # the fewest items a gain (or a bag) adds
STEP_DELIMITER = "\n\n"
THOUGHT_OPEN = "<Thought>\n"


@dataclass(frozen=True, slots=True)
class ArithmeticProblem:
    id: str
    question: str
    answer: str
    solution: str  # the assistant's correct response: <Thought> steps, then <Output>
    changes: int  # how many worked steps (its length, for accuracy by length)
    steps: tuple[str, ...] = ()  # the worked steps, start and conclusion included

    def row(self) -> dict:
        return {"id": self.id, "question": self.question, "answer": self.answer, "changes": self.changes}


def _change(rng: random.Random, name: str, item: str, total: int) -> tuple[str, str, int]:
    """One change to ``total``: (question sentence, worked step, new total)."""
    kinds = []
    if total + MIN_GAIN <= MAX_COUNT:
        kinds.append("gain")
    if total + 2 * MIN_GAIN <= MAX_COUNT:  # two bags of two
        kinds.append("gain_bags")
    if total >= 12:
        kinds += ["loss", "loss", "split"]
    if total * 2 <= MAX_COUNT:
        kinds.append("multiply")
    kind = rng.choice(kinds)
    if kind == "gain":
        n = rng.randint(MIN_GAIN, min(99, MAX_COUNT - total))
        return (f"Then {name} {rng.choice(GAINS).format(n=n)}.", f"{name} gains {n}, so {total} + {n} = {total + n}.",
                total + n)
    if kind == "loss":
        n = rng.randint(2, min(99, total - 1))
        return (f"Then {name} {rng.choice(LOSSES).format(n=n)}.", f"{name} loses {n}, so {total} - {n} = {total - n}.",
                total - n)
    if kind == "gain_bags":
        bags = rng.randint(2, min(9, (MAX_COUNT - total) // MIN_GAIN))
        size = rng.randint(MIN_GAIN, min(12, (MAX_COUNT - total) // bags))
        gained = bags * size
        return (f"Then {name} buys {bags} bags of {size} {item}.",
                f"{name} gains {bags} × {size} = {gained}, so {total} + {gained} = {total + gained}.", total + gained)
    if kind == "multiply":
        factor = 3 if total * 3 <= MAX_COUNT and rng.random() < 0.5 else 2
        verb = {2: "doubles", 3: "triples"}[factor]
        return (f"Then {name} {verb} the {item}.", f"{name} {verb} them, so {total} × {factor} = {total * factor}.",
                total * factor)
    piles = rng.randint(2, min(9, total // 2))
    kept, left = divmod(total, piles)
    return (f"Then {name} splits the {item} into {piles} equal piles, gives the rest away and keeps one pile.",
            f"{name} keeps one of {piles} piles, so {total} ÷ {piles} = {kept} remainder {left}, which leaves {kept}.",
            kept)


def _distractor(rng: random.Random, name: str, item: str) -> str:
    other = rng.choice([n for n in NAMES if n != name])
    return rng.choice([
        f"{other} has {rng.randint(2, 199)} {rng.choice(ITEMS)}.",
        f"{name} is {rng.randint(6, 80)} years old.",
        f"Each of the {item} costs {rng.randint(2, 20)} dollars.",
    ])


def make_problem(rng: random.Random, problem_id: str) -> ArithmeticProblem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(10, 199)
    sentences = [f"{name} has {total} {item}."]
    steps = [f"{name} starts with {total} {item}."]
    changes = rng.randint(MIN_CHANGES, MAX_CHANGES)
    for _ in range(changes):
        sentence, step, total = _change(rng, name, item, total)
        sentences.append(sentence)
        steps.append(step)
    for _ in range(rng.randint(0, MAX_DISTRACTORS)):  # anywhere after the first sentence
        sentences.insert(rng.randint(1, len(sentences)), _distractor(rng, name, item))
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    steps.append(f"So {name} has {total} {item}.")
    return ArithmeticProblem(problem_id, question, str(total), _response(steps, str(total)), changes, tuple(steps))


def _response(steps: list[str], answer: str) -> str:
    return THOUGHT_OPEN + STEP_DELIMITER.join(steps) + f"\n</Thought>\n<Output>\n{answer}\n</Output>"


def held_out_problem(problem_id: str) -> bool:
    """Whether ``problem_id`` (``arith-<seed>-<i>``, as ``make_problems`` names them) comes from a held-out seed."""
    parts = problem_id.split("-")
    return len(parts) == 3 and parts[0] == "arith" and parts[1].isdigit() and int(parts[1]) >= HELD_OUT_SEED_START


def make_problems(n: int, seed: int) -> list[ArithmeticProblem]:
    """``n`` problems from one seeded stream; ids carry the seed so sets from different seeds never collide."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [make_problem(rng, f"arith-{seed}-{i}") for i in range(n)]


def _wrong(rng: random.Random, right: int) -> int:
    """A plausible slip: one digit off by one, or a carry dropped (off by ten)."""
    while True:
        wrong = right + rng.choice([-10, -1, 1, 10])
        if wrong >= 0:
            return wrong


def _mistaken_steps(rng: random.Random, problem: ArithmeticProblem) -> tuple[list[str], int]:
    """The worked steps with one slip in a change step, carried forward; and the index of the slipped step.

    The slip replaces the step's result; every later step starts from the wrong count (and computes correctly).
    The conclusion is left out: that is where the reflection goes (where the search forces it, too)."""
    while True:
        steps = list(problem.steps[:-1])
        at = rng.randint(1, problem.changes)
        head, _, tail = steps[at].partition(", so ")
        count = _wrong(rng, _result(steps[at]))
        steps[at] = _redo(steps[at], int(tail.split()[0]), result=count)
        for i in range(at + 1, len(steps)):
            steps[i] = _redo(steps[i], count)
            count = _result(steps[i])
        if count >= 0:  # a slip that would make a later count negative is not plausible: draw another
            return steps, at


def _result(step: str) -> int:
    """The count a change step ends with."""
    return int(step.rstrip(".").split()[-1])


def _redo(step: str, count: int, *, result: int | None = None) -> str:
    """Change ``step`` recomputed from ``count`` instead of the count it started from; ``result`` forces its result
    (a slip)."""
    head, _, tail = step.partition(", so ")
    if " ÷ " in tail:
        piles = int(tail.split(" ÷ ")[1].split()[0])
        kept, left = divmod(count, piles)
        kept = kept if result is None else result
        return f"{head}, so {count} ÷ {piles} = {kept} remainder {left}, which leaves {kept}."
    _, op, operand = tail.split(" = ")[0].split()
    value = {"+": count + int(operand), "-": count - int(operand), "×": count * int(operand)}[op]
    return f"{head}, so {count} {op} {operand} = {value if result is None else result}."


@dataclass(frozen=True, slots=True)
class TrainingExample:
    """A response to train on, and the character spans of it that stay out of the loss (a deliberate slip)."""

    response: str
    unscored: tuple[tuple[int, int], ...] = ()


def make_training_example(rng: random.Random, problem: ArithmeticProblem, *, reflection_rate: float
                          ) -> TrainingExample:
    """The problem's correct solution, or (with probability ``reflection_rate``) a slip, the reflection phrase and
    the correct solution from scratch."""
    if rng.random() >= reflection_rate:
        return TrainingExample(problem.solution)
    slipped, at = _mistaken_steps(rng, problem)
    response = _response([*slipped, REFLECTION_PHRASE, *problem.steps], problem.answer)
    start = len(THOUGHT_OPEN + STEP_DELIMITER.join(slipped[:at]) + STEP_DELIMITER)  # at >= 1: the start step first
    return TrainingExample(response, ((start, start + len(slipped[at])),))


def write_problems(path: str | Path, n: int, seed: int) -> Path:
    """Write ``n`` problems as JSONL rows of id, question, answer and changes (the number of worked steps): the
    format ``forest build``/``eval`` read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for problem in make_problems(n, seed):
            f.write(json.dumps(problem.row()) + "\n")
    return path
