"""A deterministic SIMULATED engine and tokenizer, for unit tests and the tree-manager scale benchmark only.

No model: ``SimulatedEngine`` writes Marco-o1-shaped responses (``<Thought>`` steps of random words
separated by blank lines, then ``</Thought><Output>ANSWER</Output>`` and EOS) with synthetic logprobs.
The probability of each sampled token, and so its confidence, is ``quality(context)``: a test can make one
branch better than the others and check that the search finds it. ``ScoringSimulatedEngine`` is also a SIMULATED
value model (``Scorer``): ``judge(response_ids)`` scores a response prefix. Integration tests use real vLLM engines.
"""

from __future__ import annotations

import asyncio
import math
import string
import zlib
from typing import Callable, Sequence

import numpy as np

from search.confidence import with_confidences
from search.protocol import TOP_K, Chunk, ChunkBuilder, FinishReason, GenerationRequest, ScoreRequest

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "\n\n", "<Thought>", "</Thought>", "<Output>",
                  "</Output>")
WORDS = tuple(f" w{i}" for i in range(16))
SIMULATED_BLOCK_SIZE = 16


class SimulatedTokenizer:
    """Special tokens, 16 word tokens and one token per printable character; greedy longest-match encoding."""

    def __init__(self):
        self.vocab: list[str] = list(SPECIAL_TOKENS) + list(WORDS) + list(string.printable)
        self.ids = {text: i for i, text in enumerate(self.vocab)}
        self._multi = sorted((t for t in self.vocab if len(t) > 1), key=len, reverse=True)
        self.eos_token_id = self.ids["<|im_end|>"]
        self.word_ids = [self.ids[w] for w in WORDS]

    def encode(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            match = next((t for t in self._multi if text.startswith(t, i)), text[i])
            if match not in self.ids:
                raise ValueError(f"SimulatedTokenizer cannot encode {match!r}")
            out.append(self.ids[match])
            i += len(match)
        return out

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(map(self.vocab.__getitem__, map(int, token_ids)))


KNUTH_HASH = 2_654_435_761  # Knuth's multiplicative hash: spreads consecutive token ids over [0, 1000)
QUALITY_LOW, QUALITY_SPAN = 0.3, 0.65


def default_quality(response: np.ndarray) -> float:
    """A fixed pseudo-random quality in [0.3, 0.95] per first response word."""
    first = int(response[0]) if len(response) else 0
    return QUALITY_LOW + QUALITY_SPAN * ((first * KNUTH_HASH) % 1000) / 1000


class SimulatedEngine:
    """Implements the ``Engine`` protocol without a model (SIMULATED; see the module docstring).

    quality(response_ids) -> probability of the next sampled token, in (0, 1]; answer(response_ids) -> the
    answer text written in ``<Output>``. ``response_ids`` are the tokens after the prompt's last
    ``<|im_start|>assistant\\n``. Steps take ``step_tokens`` words; the answer comes after ``steps`` steps.
    """

    def __init__(self, tokenizer: SimulatedTokenizer | None = None, *, seed: int = 0,
                 quality: Callable[[np.ndarray], float] = default_quality,
                 answer: Callable[[np.ndarray], str] = lambda response: "42",
                 steps: int = 3, step_tokens: tuple[int, int] = (2, 6), latency_s: float = 0.0):
        self.tokenizer = tokenizer or SimulatedTokenizer()
        self.seed, self.quality, self.answer = seed, quality, answer
        self.steps, self.step_tokens, self.latency_s = steps, step_tokens, latency_s
        self.calls = 0
        self.requests: list[GenerationRequest] = []
        self._cached_blocks: set[int] = set()
        ids = self.tokenizer.ids
        self._header = [ids["<|im_start|>"], *self.tokenizer.encode("assistant\n")]
        self._delim, self._thought = ids["\n\n"], ids["<Thought>"]

    async def generate(self, request: GenerationRequest) -> list[Chunk]:
        self.calls += 1
        self.requests.append(request)
        cached = self._prefix_cache(np.asarray(request.prompt_token_ids))
        await asyncio.sleep(self.latency_s)
        prompt = [int(t) for t in request.prompt_token_ids]
        start = self._response_start(prompt)
        base = request.seed if request.seed is not None else self.calls
        digest = zlib.crc32(np.asarray(prompt, dtype=np.int32).tobytes())
        return [self._sample(prompt, start, request, np.random.default_rng([self.seed, base, digest, i]), cached)
                for i in range(request.n)]

    def _response_start(self, prompt: list[int]) -> int:
        h = len(self._header)
        for i in range(len(prompt) - h, -1, -1):
            if prompt[i:i + h] == self._header:
                return i + h
        return len(prompt)

    def _sample(self, prompt, start, request: GenerationRequest, rng, cached: int) -> Chunk:
        context, builder, generated = list(prompt), ChunkBuilder(), []
        finish = FinishReason.LENGTH
        while len(generated) < request.max_tokens:
            response = np.asarray(context[start:], dtype=np.int32)
            token = self._next_token(response, rng)
            q = min(max(float(self.quality(response)), 1e-6), 1.0)
            others = rng.choice([w for w in self.tokenizer.word_ids if w != token], TOP_K - 1, replace=False)
            other_lp = math.log((1 - q) / (TOP_K - 1)) if q < 1 else -math.inf
            builder.add(token, math.log(q), [token, *others.tolist()], [math.log(q)] + [other_lp] * (TOP_K - 1))
            context.append(token)
            generated.append(token)
            if token == self.tokenizer.eos_token_id:
                finish = FinishReason.EOS
                break
            tail = self.tokenizer.decode(generated[-8:])
            if token in request.stop_token_ids or any(s in tail for s in request.stop):
                finish = FinishReason.STOP
                break
        return with_confidences(builder.build(finish, cached))

    def _next_token(self, response: np.ndarray, rng) -> int:
        """The next token of a scripted Marco-o1 response, given the response so far."""
        ids = response.tolist()
        if self._thought not in ids:
            return self._thought
        steps = ids.count(self._delim)
        if steps >= self.steps:
            last = len(ids) - 1 - ids[::-1].index(self._delim)
            script = self.tokenizer.encode(f"</Thought>\n<Output>{self.answer(response)}</Output>")
            done = len(ids) - last - 1
            return script[done] if done < len(script) else self.tokenizer.eos_token_id
        marker = self._delim if self._delim in ids else self._thought
        since = ids[::-1].index(marker)  # words since the last step began
        low, high = self.step_tokens
        if since >= high or (since >= low and rng.random() < 0.5):
            return self._delim
        return int(rng.choice(self.tokenizer.word_ids))

    def _prefix_cache(self, prompt: np.ndarray) -> int:
        """Tokens of ``prompt`` in full blocks seen before (a simulated prefix cache)."""
        cached, chain, hit = 0, 0, True
        for end in range(SIMULATED_BLOCK_SIZE, len(prompt) + 1, SIMULATED_BLOCK_SIZE):
            chain = zlib.crc32(prompt[end - SIMULATED_BLOCK_SIZE:end].tobytes(), chain)
            if hit and chain in self._cached_blocks:
                cached = end
            else:
                hit = False
                self._cached_blocks.add(chain)
        return cached


class ScoringSimulatedEngine(SimulatedEngine):
    """A ``SimulatedEngine`` that is also a ``Scorer`` (SIMULATED): the score at a position is
    ``judge(response_ids)`` of the response up to and including it."""

    def __init__(self, tokenizer: SimulatedTokenizer | None = None, *,
                 judge: Callable[[np.ndarray], float] = lambda response: 0.5, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.judge = judge
        self.score_requests: list[ScoreRequest] = []

    async def score(self, request: ScoreRequest) -> np.ndarray:
        self.score_requests.append(request)
        await asyncio.sleep(self.latency_s)
        ids = [int(t) for t in request.token_ids]
        start = self._response_start(ids)
        return np.asarray([self.judge(np.asarray(ids[start:p + 1], dtype=np.int32)) for p in request.positions],
                          dtype=np.float32)
