"""The one protocol between the search core and language-model engines.

Token ids are the canonical content of every node. A request carries the full prompt as token ids
(root prompt + the ids along the node's path) so that engines never re-tokenise and vLLM's prefix cache
reuses the shared ancestors. A ``Chunk`` keeps its logprobs columnar: a few fixed-shape arrays per chunk,
never a dict per token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

TOP_K = 5
"""Alternatives kept per position: Marco-o1's confidence uses the top-5."""

NO_TOKEN = -1
"""Filler in ``top_ids`` when an engine reports fewer than ``TOP_K`` alternatives (its logprob is -inf)."""


class FinishReason(enum.IntEnum):
    LENGTH = 0  # ``max_tokens`` reached
    STOP = 1  # a stop string or stop token id
    EOS = 2  # the model's end-of-sequence token
    ABORTED = 3  # the engine dropped the request


class EngineError(Exception):
    """A request failed; the engine is fine and the request may be retried or re-sent elsewhere."""


class EngineDeadError(EngineError):
    """The engine itself is gone: re-send its work to another engine."""


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One engine call: ``n`` samples continuing ``prompt_token_ids``.

    prompt_token_ids: int32 [P]. ``logprobs`` is the number of alternatives returned per position.
    """

    prompt_token_ids: np.ndarray
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int = TOP_K
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Chunk:
    """One generated sample.

    token_ids: int32 [T]; logprobs: float32 [T], of the sampled token; top_ids: int32 [T, TOP_K] and
    top_logprobs: float32 [T, TOP_K], the engine's top alternatives per position (NO_TOKEN / -inf filler).
    Logprobs are the model's raw ones (before temperature), so confidence does not depend on sampling settings.
    num_cached_tokens: prompt tokens the engine served from its prefix cache.
    confidences: float64 [T], Marco-o1's token confidence per position when the engine adapter computed it
    (``search.confidence.with_confidences``: a worker does, so the tree manager's core does not); None: the
    search computes it.
    """

    token_ids: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    finish_reason: FinishReason
    num_cached_tokens: int = 0
    confidences: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
class ChunkBuilder:
    """Collects per-position logprob data into a ``Chunk``'s fixed-shape arrays (for engine adapters)."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_ids: list[Sequence[int]] = field(default_factory=list)
    top_logprobs: list[Sequence[float]] = field(default_factory=list)

    def add(self, token_id: int, logprob: float, top_ids: Sequence[int], top_logprobs: Sequence[float]) -> None:
        pad = TOP_K - len(top_ids)
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        self.top_ids.append(list(top_ids[:TOP_K]) + [NO_TOKEN] * max(pad, 0))
        self.top_logprobs.append(list(top_logprobs[:TOP_K]) + [-np.inf] * max(pad, 0))

    def build(self, finish_reason: FinishReason, num_cached_tokens: int = 0) -> Chunk:
        return Chunk(
            token_ids=np.asarray(self.token_ids, dtype=np.int32),
            logprobs=np.asarray(self.logprobs, dtype=np.float32),
            top_ids=np.asarray(self.top_ids, dtype=np.int32).reshape(-1, TOP_K),
            top_logprobs=np.asarray(self.top_logprobs, dtype=np.float32).reshape(-1, TOP_K),
            finish_reason=finish_reason,
            num_cached_tokens=num_cached_tokens,
        )


class Engine(Protocol):
    """Anything that turns a request into ``request.n`` chunks (a vLLM worker, the simulated engine)."""

    async def generate(self, request: GenerationRequest) -> list[Chunk]: ...


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    """One value-model call: the scores of a token sequence (prompt + a line's tokens) at ``positions``.

    token_ids: int32 [L]; positions: indices into it, usually step ends (the last token of a step);
    prompt_tokens: how many of ``token_ids`` are the prompt (a value model that reads its own input format needs
    the prompt and the line apart; 0 when unknown).
    """

    token_ids: np.ndarray
    positions: tuple[int, ...]
    request_id: str = ""
    prompt_tokens: int = 0


class Scorer(Protocol):
    """A process reward model: for each requested position, the probability that the line up to there is on a
    way to a correct answer (float32 [len(positions)] in [0, 1])."""

    async def score(self, request: ScoreRequest) -> np.ndarray: ...


class Tokenizer(Protocol):
    """The little the search needs of a tokenizer: text is derived from token ids, never the reverse."""

    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...
