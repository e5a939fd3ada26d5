"""Search hyperparameters as frozen dataclasses, validated on construction.

Errors name the field and the bad value (``ConfigError``), so a YAML typo is reported as such. The
pydantic configs at the edge (``cluster.config``) build these; the search core never sees a config object.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""

    def __init__(self, field: str, value, reason: str):
        super().__init__(f"{field}={value!r}: {reason}")
        self.field = field


def _require(condition: bool, field: str, value, reason: str) -> None:
    if not condition:
        raise ConfigError(field, value, reason)


@dataclass(frozen=True, slots=True)
class Granularity:
    """What one action is: a ``step`` (ends at ``delimiter``) or a ``mini_step`` of exactly ``tokens`` tokens."""

    kind: str  # "step" | "mini_step"
    tokens: int  # mini_step: chunk length; step: the most tokens one step may take
    delimiter: str = "\n\n"

    @classmethod
    def parse(cls, text: str, *, max_step_tokens: int = 256, delimiter: str = "\n\n") -> "Granularity":
        """``step`` or ``mini_step:N`` (for example ``mini_step:64``)."""
        _require(isinstance(text, str), "granularity", text, "expected 'step' or 'mini_step:N'")
        if text == "step":
            _require(max_step_tokens >= 1, "max_step_tokens", max_step_tokens, "must be >= 1")
            _require(bool(delimiter), "step_delimiter", delimiter, "must not be empty")
            return cls("step", max_step_tokens, delimiter)
        name, _, count = text.partition(":")
        _require(name == "mini_step" and count.isdigit() and int(count) >= 1, "granularity", text,
                 "expected 'step' or 'mini_step:N' with N >= 1, e.g. 'mini_step:64'")
        return cls("mini_step", int(count), delimiter)

    def __str__(self) -> str:
        return "step" if self.kind == "step" else f"mini_step:{self.tokens}"


class ReflectionMode(enum.Enum):
    OFF = "off"
    ALWAYS = "always"
    BELOW = "below"
    WRONG_ANSWER = "wrong_answer"


@dataclass(frozen=True, slots=True)
class ReflectionPolicy:
    """When to add a reflection child where a thought ends: ``off | always | below:<value> | wrong_answer``."""

    mode: ReflectionMode = ReflectionMode.OFF
    threshold: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "ReflectionPolicy":
        name, _, value = str(text).partition(":")
        modes = {m.value: m for m in ReflectionMode}
        _require(name in modes, "reflection", text, "expected off, always, below:<value> or wrong_answer")
        mode = modes[name]
        if mode is ReflectionMode.BELOW:
            try:
                threshold = float(value)
            except ValueError:
                raise ConfigError("reflection", text, "below needs a number, e.g. below:0.6") from None
            _require(0.0 <= threshold <= 1.0, "reflection", text, "the threshold must lie in [0, 1]")
            return cls(mode, threshold)
        _require(value == "", "reflection", text, f"{name} takes no value")
        return cls(mode)

    def __str__(self) -> str:
        return f"below:{self.threshold:g}" if self.mode is ReflectionMode.BELOW else self.mode.value


class ValueKind(enum.Enum):
    ROLLOUT_CONFIDENCE = "rollout_confidence"  # the paper's: mean token confidence of a rollout to a terminal
    LINE_CONFIDENCE = "line_confidence"  # mean token confidence of the whole line, root to its end
    CHUNK_CONFIDENCE = "chunk_confidence"  # no rollout: mean token confidence of the new child's own chunk
    ANSWER_CHECK = "answer_check"  # rollout, then 1 if its answer matches the reference else 0
    REWARD_MODEL = "reward_model"  # no rollout: a process reward model's score of the node's prefix (a Scorer)
    REWARD_MODEL_ROLLOUT = "reward_model_rollout"  # a rollout, then the value model's score of the finished line


class StepCheck(enum.Enum):
    """A tool that verifies each step the model writes (``search.checks``); a step that fails it ends its line."""

    OFF = "off"
    ARITHMETIC = "arithmetic"  # every "a op b = c" the line writes must hold


class FinalChoice(enum.Enum):
    """How the answer is chosen from the finished lines of a tree (a line the model ended with an answer)."""

    VOTE = "vote"  # the answer with the largest sum of line values; its best-valued line is the response
    BEST_VALUE = "best_value"  # the best-valued finished line
    MOST_VISITS = "most_visits"  # descend by visits (Marco-o1's rule); a leaf that is no finished line gives way


@dataclass(frozen=True, slots=True)
class Budget:
    """Stopping rules; a search stops at whichever comes first. ``None`` means no limit."""

    iterations: int = 32
    tokens: int | None = None  # generated tokens, never exceeded (reserved before each request)
    seconds: float | None = None

    def __post_init__(self):
        _require(isinstance(self.iterations, int) and self.iterations >= 1, "iterations", self.iterations,
                 "must be an integer >= 1")
        _require(self.tokens is None or (isinstance(self.tokens, int) and self.tokens >= 1), "budget_tokens",
                 self.tokens, "must be an integer >= 1 or unset")
        _require(self.seconds is None or (self.seconds > 0 and math.isfinite(self.seconds)), "budget_seconds",
                 self.seconds, "must be > 0 or unset")


@dataclass(frozen=True, slots=True)
class MCTSParams:
    """Everything one tree search needs besides the engine, the tokenizer and the problem."""

    granularity: Granularity = Granularity("step", 256)
    children: int = 2  # k: children per expansion, sampled by one request with n=k
    exploration: float = 0.5  # UCT constant c (over normalised values; chosen on a development set, docs/tuning.md)
    max_depth: int = 16  # a node at this depth is terminal
    max_path_tokens: int = 1024  # generated tokens along one path (prompt excluded); reaching it is terminal
    parallel: int = 4  # iterations of this tree in flight at once (virtual loss keeps them apart)
    temperature: float = 1.0  # every sampling strategy's (chosen for the bundled model on development problems)
    top_p: float = 1.0
    value: ValueKind = ValueKind.LINE_CONFIDENCE
    reflection: ReflectionPolicy = ReflectionPolicy()
    max_reflections: int = 1  # reflection nodes allowed on one path
    final: FinalChoice = FinalChoice.BEST_VALUE
    budget: Budget = Budget()
    early_stop: bool = True  # most_visits only: stop once no remaining iteration can change the root's choice
    seed: int | None = None  # seeds each request (deterministic with a deterministic engine)
    normalize_values: bool = True  # UCT sees values min-max normalised over the tree's values (as mctx does)
    unanswered_value: float = 0.0  # the value of a line that ends without an answer (cut by a budget or limit)
    widening: float = 1.0  # progressive widening: a node may have children + floor(widening * sqrt(visits))
    max_width: int = 4  # children one node may get, widening included (a reflection child not counted)
    dedup: bool = True  # an expansion's sample identical to a sibling is merged into it (its weight), not added
    refill_width: bool = True  # nothing left to expand and budget left: every node's width cap rises by one
    reward_weight: float = 1.0  # value=reward_model: w * score + (1 - w) * the line's mean token confidence
    step_check: StepCheck = StepCheck.OFF  # a step that fails it ends its line unanswered (search.checks)
    retry_temperature: float | None = None  # samples from a node whose step failed step_check (None: temperature)
    # with a value model: a step whose prefix scores below this fails as a step_check failure does (the value
    # model as a learned check; each new line is scored at every new step's end)
    min_step_score: float | None = None
    # with a reference answer (a build's problems): end the search at its first finished line that answers it and
    # passes step_check, so a data build spends no more on a problem once it holds a right line
    stop_when_right: bool = False

    def __post_init__(self):
        _require(isinstance(self.children, int) and self.children >= 1, "children", self.children, "k must be >= 1")
        _require(self.exploration >= 0 and math.isfinite(self.exploration), "exploration", self.exploration,
                 "must be a finite number >= 0")
        _require(self.max_depth >= 1, "max_depth", self.max_depth, "must be >= 1")
        _require(self.max_path_tokens >= 1, "max_path_tokens", self.max_path_tokens, "must be >= 1")
        _require(self.parallel >= 1, "parallel", self.parallel, "must be >= 1")
        _require(self.temperature >= 0, "temperature", self.temperature, "must be >= 0")
        _require(self.retry_temperature is None or self.retry_temperature >= 0, "retry_temperature",
                 self.retry_temperature, "must be >= 0 or unset")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "must lie in (0, 1]")
        _require(self.max_reflections >= 0, "max_reflections", self.max_reflections, "must be >= 0")
        _require(math.isfinite(self.unanswered_value), "unanswered_value", self.unanswered_value, "must be finite")
        _require(self.widening >= 0 and math.isfinite(self.widening), "widening", self.widening,
                 "must be a finite number >= 0")
        _require(0 <= self.reward_weight <= 1, "reward_weight", self.reward_weight, "must lie in [0, 1]")
        _require(self.min_step_score is None or 0 <= self.min_step_score <= 1, "min_step_score",
                 self.min_step_score, "must lie in [0, 1] or be unset")
        _require(isinstance(self.max_width, int) and self.max_width >= self.children, "max_width", self.max_width,
                 f"must be an integer >= children ({self.children})")
