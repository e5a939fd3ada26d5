"""Step checks: a tool that verifies what a line writes, so a search can drop a step that fails it.

rStar-Math keeps a step only when the Python code it writes runs; the arithmetic check is the same idea for
chains of thought that write their calculations in words: every ``a op b = c`` (``+ - × * x ÷ /``, a division
optionally ``= q remainder r``) the line has finished writing must hold. A check reads the model's text only, never
the reference answer, so it applies when answering as well as when building data. On the bundled model nearly every
wrong line writes a false equation (docs/tuning.md), so a tree that ends a line at such a step and samples the step
again mends the error where it was made, where best-of-N can only drop the whole sample.
"""

from __future__ import annotations

import operator
import re

from search.params import StepCheck

EQUATION = re.compile(
    r"(?<![\d.,])(\d+)\s*([-+×*x÷/−])\s*(\d+)\s*=\s*(?P<result>\d+)(?:\s+remainder\s+(?P<remainder>\d+))?(?![\d]|[.,]\d)")
"""``a op b = c`` or ``a ÷ b = q remainder r`` between whole numbers (not part of a decimal or a 1,234); the named
groups are what an equation claims (its result and remainder), the text a verifier scores (``marked_spans``)."""


_ARITHMETIC = {"+": operator.add, "-": operator.sub, "−": operator.sub, "×": operator.mul, "*": operator.mul,
               "x": operator.mul}
_DIVISION = frozenset("÷/")


def _holds(a: int, op: str, b: int, c: int, remainder: int | None) -> bool:
    if op in _DIVISION:
        r = 0 if remainder is None else remainder
        return b > 0 and 0 <= r < b and a == b * c + r
    # "= c remainder r" only means something after a division
    return remainder is None and _ARITHMETIC[op](a, b) == c


def false_equation(text: str) -> str | None:
    """The first equation of ``text`` that does not hold (as written), or None when every one holds."""
    for match in EQUATION.finditer(text):
        a, op, b, c, remainder = match.groups()
        if not _holds(int(a), op, int(b), int(c), None if remainder is None else int(remainder)):
            return match.group(0)
    return None


def marked_spans(pattern: re.Pattern, text: str) -> list[tuple[int, int]]:
    """The character spans of ``text`` that ``pattern`` marks: every named group that matched, in each match; the
    whole match when the pattern names no group."""
    spans = []
    for match in pattern.finditer(text):
        if not pattern.groupindex:
            spans.append(match.span())
            continue
        spans.extend(match.span(name) for name in pattern.groupindex if match.group(name) is not None)
    return spans


def written(text: str, *, complete: bool) -> str:
    """The part of a line whose equations are finished: all of it when the line is ``complete``, else up to its
    last newline (an equation never spans one, and the last line may stop mid-number: "123 - 82 = 4")."""
    return text if complete else text[:text.rfind("\n") + 1]


def passes(check: StepCheck, text: str, *, complete: bool) -> bool:
    """Whether the line ``text`` (the response so far) passes ``check``."""
    if check is StepCheck.OFF:
        return True
    return false_equation(written(text, complete=complete)) is None
