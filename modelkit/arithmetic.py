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

These are the default ranges of ``Distribution``; others (``forest make-problems --distribution``) make harder
problems, for a model trained on them.

Difficulty comes from the problems: multi-digit carries, products and remainders computed in one step, and mistakes
that compound over the steps, so longer problems are harder for a model of any size.

``make_training_example`` can add Marco-o1-style reflection: the worked steps make one plausible mistake (a wrong
digit or a dropped carry) and carry it forward, then the reflection phrase starts the solution again from scratch,
correctly. The mistaken step is marked so that training can leave it out of the loss (the model learns to notice
and redo, not to make the mistake).

It can also write some steps the long way (``long_form``): a product by a two-digit bag size as tens plus units, a
division with a long quotient digit by digit. A model trained on both forms has two ways to a hard step, a quick
one that fails where the numbers are too big for it and a careful one that it takes in only some of its samples,
as a real model has: meant to give sampling more responses, or searching, something to find that greedy decoding
does not (docs/model.md says how far it does).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from search.prompts import REFLECTION_PHRASE, split_response

HELD_OUT_SEED_START = 1_000_000

NAMES = ["Ann", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lou", "Max", "Ned", "Oli", "Pam"]
ITEMS = ["apples", "books", "coins", "pens", "cards", "eggs", "shells", "stamps", "marbles", "cookies"]
GAINS = ["buys {n} more", "finds {n} more", "gets {n} more from a friend", "wins {n} more"]
LOSSES = ["gives away {n}", "loses {n}", "sells {n}", "eats {n}"]
MIN_GAIN = 2  # the fewest items a gain, a loss or a bag adds or takes; also the fewest bags, piles and the least factor
MIN_COUNT_TO_LOSE = 12  # losses and splits are drawn only from this count up
MULTIPLY_VERBS = {2: "doubles", 3: "triples"}  # other factors read "multiplies them by N"
STEP_DELIMITER = "\n\n"
THOUGHT_OPEN = "<Thought>\n"
START, CONCLUSION = "start", "conclusion"  # the kinds of the first and the last worked step
CHANGE_KINDS = ("gain", "loss", "bags", "multiply", "split")  # the kinds of the steps in between
STEP_KINDS = (START, *CHANGE_KINDS, CONCLUSION)
# how ``long_form`` writes each digit's part of a long division: its remainder in one go, or by the digit's product
REMAINDERS, PRODUCTS = "remainders", "products"
LONG_DIVISIONS = (REMAINDERS, PRODUCTS)


@dataclass(frozen=True, slots=True)
class Distribution:
    """The ranges ``forest make-problems`` draws from (each inclusive); the defaults are the bundled model's.
    Other ranges (``--distribution changes=1-5 ...``) make other problems for models trained on them."""

    start: tuple[int, int] = (100, 9999)  # the first count
    changes: tuple[int, int] = (3, 10)  # worked steps per problem, each number equally likely
    max_count: int = 99999  # no count goes above it
    max_gain: int = 999  # the most a gain or a loss moves
    max_bags: int = 99  # bags bought in one change ...
    max_bag_size: int = 99  # ... of up to this many items each: a product
    max_factor: int = 9  # doubles, triples, "ends up with N times as many"
    max_piles: int = 99  # "splits into N equal piles": a division with a remainder
    max_distractors: int = 2  # sentences the solution never uses

    def __post_init__(self):
        (low, high), (fewest, most) = self.start, self.changes
        problems = [f"start must be a range 1 <= low <= high <= max_count ({self.max_count}), got {low}-{high}"
                    ] if not 1 <= low <= high <= self.max_count else []
        if not 1 <= fewest <= most:
            problems.append(f"changes must be a range 1 <= low <= high, got {fewest}-{most}")
        problems += [f"{name} must be >= {MIN_GAIN}, got {getattr(self, name)}"
                     for name in ("max_gain", "max_bags", "max_bag_size", "max_factor", "max_piles")
                     if getattr(self, name) < MIN_GAIN]
        if self.max_count < 2 * MIN_COUNT_TO_LOSE or self.max_distractors < 0:  # below it, a count can get stuck
            problems.append(f"max_count must be >= {2 * MIN_COUNT_TO_LOSE} and max_distractors >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def parse(cls, settings: list[str]) -> "Distribution":
        """The default ranges with ``KEY=VALUE`` settings applied (``start=10-999``, ``max_bags=49``)."""
        fields = {}
        for setting in settings:
            key, sep, value = setting.partition("=")
            if not sep or key not in cls.__dataclass_fields__:
                raise ValueError(f"a distribution setting is KEY=VALUE with KEY one of "
                                 f"{', '.join(cls.__dataclass_fields__)}; got {setting!r}")
            try:
                fields[key] = (tuple(int(v) for v in value.split("-", 1)) if key in ("start", "changes")
                               else int(value))
            except ValueError:
                raise ValueError(f"{key} takes {'LOW-HIGH' if key in ('start', 'changes') else 'an integer'}, "
                                 f"got {value!r}") from None
            if isinstance(fields[key], tuple) and len(fields[key]) != 2:
                raise ValueError(f"{key} takes LOW-HIGH, got {value!r}")
        return cls(**fields)


DEFAULT_DISTRIBUTION = Distribution()


@dataclass(frozen=True, slots=True)
class ArithmeticProblem:
    id: str
    question: str
    answer: str
    solution: str  # the assistant's correct response: <Thought> steps, then <Output>
    changes: int  # how many worked steps (its length, for accuracy by length)
    steps: tuple[str, ...] = ()  # the worked steps, start and conclusion included
    kinds: tuple[str, ...] = ()  # each worked step's kind: START, one of CHANGE_KINDS, CONCLUSION

    def row(self) -> dict:
        return {"id": self.id, "question": self.question, "answer": self.answer, "changes": self.changes}


def _change(rng: random.Random, name: str, item: str, total: int, dist: Distribution = DEFAULT_DISTRIBUTION
            ) -> tuple[str, str, int, str]:
    """One change to ``total``: (question sentence, worked step, new total, kind). Only changes that keep the
    count in range are drawn."""
    room = dist.max_count - total
    kinds = []
    if room >= MIN_GAIN:
        kinds.append("gain")
    if room >= MIN_GAIN * MIN_GAIN:  # two bags of two
        kinds.append("bags")
    if total >= MIN_COUNT_TO_LOSE:
        kinds += ["loss", "loss", "split"]
    if total * MIN_GAIN <= dist.max_count:
        kinds.append("multiply")
    kind = rng.choice(kinds)
    if kind == "gain":
        n = rng.randint(MIN_GAIN, min(dist.max_gain, room))
        return (f"Then {name} {rng.choice(GAINS).format(n=n)}.", f"{name} gains {n}, so {total} + {n} = {total + n}.",
                total + n, kind)
    if kind == "loss":
        n = rng.randint(MIN_GAIN, min(dist.max_gain, total - 1))
        return (f"Then {name} {rng.choice(LOSSES).format(n=n)}.", f"{name} loses {n}, so {total} - {n} = {total - n}.",
                total - n, kind)
    if kind == "bags":
        bags = rng.randint(MIN_GAIN, min(dist.max_bags, room // MIN_GAIN))
        size = rng.randint(MIN_GAIN, min(dist.max_bag_size, room // bags))
        gained = bags * size
        return (f"Then {name} buys {bags} bags of {size} {item}.",
                f"{name} gains {bags} × {size} = {gained}, so {total} + {gained} = {total + gained}.",
                total + gained, kind)
    if kind == "multiply":
        factors = range(MIN_GAIN, min(dist.max_factor, dist.max_count // total) + 1)
        # the largest factor first, and no draw when there is one choice: streams of the default ranges stay as
        # the bundled model's problems were drawn
        factor = factors[-1 - int(rng.random() * len(factors))] if len(factors) > 1 else factors[0]
        if factor in MULTIPLY_VERBS:
            sentence, did = f"Then {name} {MULTIPLY_VERBS[factor]} the {item}.", f"{MULTIPLY_VERBS[factor]} them"
        else:
            sentence, did = f"Then {name} ends up with {factor} times as many {item}.", f"multiplies them by {factor}"
        return sentence, f"{name} {did}, so {total} × {factor} = {total * factor}.", total * factor, kind
    piles = rng.randint(MIN_GAIN, min(dist.max_piles, total // MIN_GAIN))
    kept, left = divmod(total, piles)
    return (f"Then {name} splits the {item} into {piles} equal piles, gives the rest away and keeps one pile.",
            f"{name} keeps one of {piles} piles, so {total} ÷ {piles} = {kept} remainder {left}, which leaves {kept}.",
            kept, kind)


def _distractor(rng: random.Random, name: str, item: str) -> str:
    other = rng.choice([n for n in NAMES if n != name])
    return rng.choice([
        f"{other} has {rng.randint(2, 199)} {rng.choice(ITEMS)}.",
        f"{name} is {rng.randint(6, 80)} years old.",
        f"Each of the {item} costs {rng.randint(2, 20)} dollars.",
    ])


def make_problem(rng: random.Random, problem_id: str, dist: Distribution = DEFAULT_DISTRIBUTION
                 ) -> ArithmeticProblem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(*dist.start)
    sentences = [f"{name} has {total} {item}."]
    steps, kinds = [f"{name} starts with {total} {item}."], [START]
    changes = rng.randint(*dist.changes)
    for _ in range(changes):
        sentence, step, total, kind = _change(rng, name, item, total, dist)
        sentences.append(sentence)
        steps.append(step)
        kinds.append(kind)
    for _ in range(rng.randint(0, dist.max_distractors)):  # anywhere after the first sentence
        sentences.insert(rng.randint(1, len(sentences)), _distractor(rng, name, item))
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    steps.append(f"So {name} has {total} {item}.")
    kinds.append(CONCLUSION)
    return ArithmeticProblem(problem_id, question, str(total), _response(steps, str(total)), changes, tuple(steps),
                             tuple(kinds))


def _response(steps: list[str], answer: str) -> str:
    return THOUGHT_OPEN + STEP_DELIMITER.join(steps) + f"\n</Thought>\n<Output>\n{answer}\n</Output>"


def first_wrong_step(problem: ArithmeticProblem, response: str) -> tuple[int, str] | None:
    """The index in ``problem.steps`` of the first worked step that ``response`` writes differently (or leaves
    out), and what it writes there; None when it writes them all as the solution does, each in its short or one of
    its long forms. A reflection phrase in place of a step is a wrong step there."""
    written = written_steps(response)
    for i, step in enumerate(problem.steps):
        text = written[i].strip() if i < len(written) else ""
        if text != step and text not in (long_form(step, d) for d in LONG_DIVISIONS):  # either long form, if any
            return i, text
    return None


def written_steps(response: str) -> list[str]:
    """The steps a response writes in its ``<Thought>``, as written (a reflection phrase is one of them)."""
    return split_response(response)[0].split(STEP_DELIMITER)


_PRODUCT = re.compile(r" (\d+) × (\d+) = (\d+), so ")  # a bags step: bags × bag size = items gained
_DIVISION = re.compile(r", so (\d+) ÷ (\d+) = (\d+) remainder (\d+), which ")  # a split step
_IN_PARTS = re.compile(r" × \d+ = \d+ × \d+ \+ | ÷ \d+: ")  # how a step written the long way starts its parts


def written_long(step: str) -> bool:
    """Whether a written step works its product or its division in parts (``long_form``'s way), right or not."""
    return bool(_IN_PARTS.search(step))


def long_form(step: str, division: str = REMAINDERS) -> str | None:
    """``step`` worked in parts, as a careful solver would, or None when it has no long form: a product by a
    two-digit bag size as the sum of its tens and its units (``47 × 38 = 47 × 30 + 47 × 8 = 1410 + 376 = 1786``),
    a division with a quotient of two digits or more digit by digit. ``division`` says how each digit's part is
    written: ``REMAINDERS`` gives its quotient and remainder in one go (``1234 ÷ 37: 123 ÷ 37 = 3 remainder 12,
    124 ÷ 37 = 3 remainder 13, so 1234 ÷ 37 = 33 remainder 13``), ``PRODUCTS`` its quotient digit, that digit
    times the divisor and the subtraction that leaves the remainder (``123 ÷ 37 = 3, 3 × 37 = 111, 123 - 111 =
    12``). All leave the same count as ``step``."""
    if division not in LONG_DIVISIONS:
        raise ValueError(f"division must be one of {', '.join(LONG_DIVISIONS)}; got {division!r}")
    if product := _PRODUCT.search(step):
        bags, size, gained = (int(g) for g in product.groups())
        tens, units = size - size % 10, size % 10
        if not tens or not units:  # a one-digit or a round bag size is worked in one go
            return None
        parts = f"{bags} × {tens} + {bags} × {units} = {bags * tens} + {bags * units}"
        return f"{step[:product.start()]} {bags} × {size} = {parts} = {gained}, so {step[product.end():]}"
    if split := _DIVISION.search(step):
        total, piles, kept, left = (int(g) for g in split.groups())
        if kept < 10:
            return None
        digits, lead = str(total), len(str(piles))
        if int(digits[:lead]) < piles:  # the first part is the shortest head of the total that piles go into
            lead += 1
        rest, parts = 0, []
        for i, digit in enumerate(digits[lead - 1:]):
            part = int(digits[:lead]) if i == 0 else rest * 10 + int(digit)
            quotient, rest = divmod(part, piles)
            parts.append(f"{part} ÷ {piles} = {quotient} remainder {rest}" if division == REMAINDERS else
                         f"{part} ÷ {piles} = {quotient}, {quotient} × {piles} = {quotient * piles}, "
                         f"{part} - {quotient * piles} = {rest}")
        return (f"{step[:split.start()]}, so {total} ÷ {piles}: {', '.join(parts)}, so {total} ÷ {piles} = "
                f"{kept} remainder {left}, which {step[split.end():]}")
    return None


def step_count(step: str) -> str | None:
    """The count a worked step leaves (its last number): a wrong step with the right count, such as a split with a
    wrong remainder, does not change the answer."""
    numbers = re.findall(r"-?\d+", step)  # a slip carried forward can leave a negative count
    return numbers[-1] if numbers else None


def held_out_seed(seed: int) -> bool:
    """Whether ``seed``'s problem stream is held out (for final tables only, never for training or tuning)."""
    return seed >= HELD_OUT_SEED_START


def held_out_problem(problem_id: str) -> bool:
    """Whether ``problem_id`` (``arith-<seed>-<i>``, as ``make_problems`` names them) comes from a held-out seed."""
    parts = problem_id.split("-")
    return len(parts) == 3 and parts[0] == "arith" and parts[1].isdigit() and held_out_seed(int(parts[1]))


def make_problems(n: int, seed: int, dist: Distribution = DEFAULT_DISTRIBUTION) -> list[ArithmeticProblem]:
    """``n`` problems from one seeded stream; ids carry the seed so sets from different seeds never collide."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [make_problem(rng, f"arith-{seed}-{i}", dist) for i in range(n)]


def _wrong(rng: random.Random, right: int) -> int:
    """A plausible slip: one digit of the result off by one (a carry dropped or added)."""
    while True:
        wrong = right + rng.choice([-1, 1]) * 10 ** rng.randrange(len(str(right)))
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
        count = _wrong(rng, int(step_count(steps[at])))
        steps[at] = _redo(steps[at], int(tail.split()[0]), result=count)
        for i in range(at + 1, len(steps)):
            steps[i] = _redo(steps[i], count)
            count = int(step_count(steps[i]))
        if count >= 0:  # a slip that would make a later count negative is not plausible: draw another
            return steps, at


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


def make_training_example(rng: random.Random, problem: ArithmeticProblem, *, reflection_rate: float,
                          long_form_rate: float = 0.0, long_division: str = REMAINDERS) -> TrainingExample:
    """The problem's correct solution, or (with probability ``reflection_rate``) a slip, the reflection phrase and
    the correct solution from scratch. With ``long_form_rate``, each correct step that has a long form
    (``long_form``, its divisions written as ``long_division`` says) is written in it with that probability: the
    careful way, which samples take about that often and greedy decoding only where the long way's first token is
    the likelier one. At rate 0 no draw is made, so the examples of runs trained without long forms stay as they
    were drawn."""
    reflects = rng.random() < reflection_rate
    steps = list(problem.steps)
    if long_form_rate:
        for i, step in enumerate(steps):
            if (long := long_form(step, long_division)) and rng.random() < long_form_rate:
                steps[i] = long
    if not reflects:
        return TrainingExample(_response(steps, problem.answer))
    slipped, at = _mistaken_steps(rng, problem)
    response = _response([*slipped, REFLECTION_PHRASE, *steps], problem.answer)
    start = len(THOUGHT_OPEN + STEP_DELIMITER.join(slipped[:at]) + STEP_DELIMITER)  # at >= 1: the start step first
    return TrainingExample(response, ((start, start + len(slipped[at])),))


def write_problems(path: str | Path, n: int, seed: int, dist: Distribution = DEFAULT_DISTRIBUTION) -> Path:
    """Write ``n`` problems as JSONL rows of id, question, answer and changes (the number of worked steps): the
    format ``forest build``/``eval`` read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for problem in make_problems(n, seed, dist):
            f.write(json.dumps(problem.row()) + "\n")
    return path
