"""Value functions: how good a state is, from what its evaluation saw.

Each is a plain function of an ``Evaluation``; ``VALUE_FUNCTIONS`` maps the configured ``ValueKind`` to
(function, needs_rollout). The value-model kinds (``SCORED_VALUES``) are the exception: their score comes from a
``Scorer`` call (a value model served on its own engine), so the driver asks for it and mixes it with the
confidence (``reward_value``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from search.params import ValueKind
from search.prompts import answers_match


@dataclass(frozen=True, slots=True)
class Evaluation:
    chunk_confidence: float  # mean token confidence of the evaluated node's own chunk (NaN if forced)
    rollout_confidence: float | None  # mean token confidence of its rollout; None when no rollout ran
    answer: str | None  # answer extracted from the node's full response (path + rollout)
    reference: str | None  # ground truth, when the problem has one
    line_confidence: float | None = None  # mean token confidence of the whole line (root to the line's end)


ValueFunction = Callable[[Evaluation], float]


def _finite_or(value: float | None, fallback: float) -> float:
    return fallback if value is None or math.isnan(value) else float(value)


def rollout_confidence(e: Evaluation) -> float:
    """Marco-o1's reward: mean token confidence over the rollout (the node's own chunk when it is terminal)."""
    return _finite_or(e.rollout_confidence, _finite_or(e.chunk_confidence, 0.0))


def line_confidence(e: Evaluation) -> float:
    """Mean token confidence over the whole line, root to end: unlike the rollout's alone, comparable between
    lines that branch at different depths (a short rollout's mean is noisier)."""
    return _finite_or(e.line_confidence, rollout_confidence(e))


def chunk_confidence(e: Evaluation) -> float:
    return _finite_or(e.chunk_confidence, 0.0)


def answer_check(e: Evaluation) -> float:
    if e.reference is None:
        raise ValueError("value=answer_check needs a reference answer for the problem")
    return 1.0 if answers_match(e.answer, e.reference) else 0.0


def reward_value(score: float, confidence: float, weight: float) -> float:
    """value=reward_model: the value model's score mixed with the line's mean token confidence (weight 1: the
    score alone)."""
    return weight * float(score) + (1.0 - weight) * _finite_or(confidence, 0.0)


SCORED_VALUES: dict[ValueKind, bool] = {
    ValueKind.REWARD_MODEL: False,  # each new node scored as it is (no rollout)
    ValueKind.REWARD_MODEL_ROLLOUT: True,  # a rollout to the end of the line, then the finished line scored
}
"""The value kinds a value model computes, mapped to needs_rollout."""

VALUE_FUNCTIONS: dict[ValueKind, tuple[ValueFunction, bool]] = {
    ValueKind.ROLLOUT_CONFIDENCE: (rollout_confidence, True),
    ValueKind.LINE_CONFIDENCE: (line_confidence, True),
    ValueKind.CHUNK_CONFIDENCE: (chunk_confidence, False),
    ValueKind.ANSWER_CHECK: (answer_check, True),
}
