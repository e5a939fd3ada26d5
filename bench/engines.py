"""Engines that drive the same search the way other designs do, for ``forest bench`` only.

- ``RecordingEngine``: passes requests through and records them, their concurrency and their tokens.
- ``LevelSyncEngine``: a barrier across trees. Every tree (run with ``parallel=1``) sends its next request, the batch
  goes to the engine together, and no tree moves on until the whole batch is back: one depth level per batch, the
  way rStar-Math's search loop runs.
- ``PerTokenEngine``: one engine call per generated token, each re-sending the whole sequence, on an engine without
  prefix caching: how Marco-o1's released inference code drives its model.
- ``CannedEngine`` (SIMULATED, the manager benchmark only): no model; cuts requests out of one scripted
  Marco-o1-shaped response with precomputed logprobs, so that nearly all time is the tree manager's own.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from search.confidence import with_confidences
from search.prompts import OUTPUT_END
from search.protocol import TOP_K, Chunk, FinishReason, GenerationRequest


class RecordingEngine:
    def __init__(self, engine, log: "RequestLog"):
        self.engine, self.log = engine, log

    async def generate(self, request: GenerationRequest) -> list[Chunk]:
        self.log.requests.append(request)
        self.log.change_in_flight(+1)
        try:
            chunks = await self.engine.generate(request)
        finally:
            self.log.change_in_flight(-1)
        self.log.generated_tokens += sum(len(c) for c in chunks)
        self.log.prompt_tokens += len(request.prompt_token_ids)
        self.log.cached_prompt_tokens += chunks[0].num_cached_tokens if chunks else 0
        return chunks


class RequestLog:
    def __init__(self):
        self.requests: list[GenerationRequest] = []
        self.in_flight = self.peak_in_flight = 0
        self.generated_tokens = self.prompt_tokens = self.cached_prompt_tokens = 0
        self.first = self.last = None  # monotonic times of the first and the latest change in flight
        self.in_flight_seconds = 0.0  # the integral of requests in flight over time

    def change_in_flight(self, delta: int) -> None:
        now = time.monotonic()
        if self.last is not None:
            self.in_flight_seconds += self.in_flight * (now - self.last)
        self.first = now if self.first is None else self.first
        self.last = now
        self.in_flight += delta
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    @property
    def mean_in_flight(self) -> float:
        """Requests in flight on average (those waiting in the pool for a slot included), from the first request
        sent to the last one back."""
        span = (self.last or 0.0) - (self.first or 0.0)
        return self.in_flight_seconds / span if span > 0 else float(self.in_flight)


class LevelSyncEngine:
    """Shared by all trees of a run; each tree must call ``tree_done`` when its search returns."""

    def __init__(self, engine, trees: int):
        self.engine, self.active = engine, trees
        self.batch: list[tuple[GenerationRequest, asyncio.Future]] = []
        self.batches = 0

    async def generate(self, request: GenerationRequest) -> list[Chunk]:
        future = asyncio.get_running_loop().create_future()
        self.batch.append((request, future))
        self._maybe_flush()
        return await future

    def tree_done(self) -> None:
        self.active -= 1
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if self.batch and len(self.batch) >= self.active:
            batch, self.batch = self.batch, []
            self.batches += 1
            asyncio.ensure_future(self._run(batch))

    async def _run(self, batch) -> None:
        results = await asyncio.gather(*(self.engine.generate(r) for r, _ in batch), return_exceptions=True)
        for (_, future), result in zip(batch, results, strict=True):  # released together: the level's barrier
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


SAMPLE_SEED_STRIDE = 104_729  # primes, so that (request seed, sample, step) never repeat a per-token seed
REQUEST_SEED_STRIDE = 7_919


class PerTokenEngine:
    """Each of the ``n`` samples is generated one token per call; stops are checked on the decoded text."""

    def __init__(self, engine, tokenizer):
        self.engine, self.tokenizer = engine, tokenizer
        self.calls = 0

    async def generate(self, request: GenerationRequest) -> list[Chunk]:
        return list(await asyncio.gather(*(self._sample(request, i) for i in range(request.n))))

    async def _sample(self, request: GenerationRequest, index: int) -> Chunk:
        prompt = np.asarray(request.prompt_token_ids, dtype=np.int32)
        parts: list[Chunk] = []
        finish = FinishReason.LENGTH
        generated: list[int] = []
        for step in range(request.max_tokens):
            seed = None if request.seed is None else (request.seed * REQUEST_SEED_STRIDE + index * SAMPLE_SEED_STRIDE
                                                      + step)
            one = GenerationRequest(np.concatenate([prompt, np.asarray(generated, dtype=np.int32)]), max_tokens=1,
                                    temperature=request.temperature, top_p=request.top_p, seed=seed,
                                    stop_token_ids=request.stop_token_ids, request_id=f"{request.request_id}-t{step}")
            self.calls += 1
            (chunk,) = await self.engine.generate(one)
            parts.append(chunk)
            generated.extend(chunk.token_ids.tolist())
            if chunk.finish_reason in (FinishReason.EOS, FinishReason.STOP):
                finish = chunk.finish_reason
                break
            tail = self.tokenizer.decode(generated[-8:])
            if any(stop in tail for stop in request.stop):
                finish = FinishReason.STOP
                break
        return Chunk(np.concatenate([c.token_ids for c in parts]), np.concatenate([c.logprobs for c in parts]),
                     np.concatenate([c.top_ids for c in parts]), np.concatenate([c.top_logprobs for c in parts]),
                     finish, 0)


class CannedEngine:
    """SIMULATED: every tree's response is one script of ``steps`` steps of ``step_tokens`` words, then the answer.

    A request's position in the script is its prompt length minus ``prompt_length`` (all trees share one prompt
    length). ``variants`` versions of the script (other words, the same structure) and of its logprobs make
    siblings differ in their tokens and their confidence.
    """

    def __init__(self, tokenizer, *, prompt_length: int, steps: int = 6, step_tokens: int = 60, variants: int = 8,
                 seed: int = 0):
        rng = np.random.default_rng(seed)
        words = [tokenizer.ids[f" w{i}"] for i in range(16)]
        delim, eos = tokenizer.ids["\n\n"], tokenizer.eos_token_id
        script = tokenizer.encode("<Thought>")
        for _ in range(steps):
            script += rng.choice(words, step_tokens).tolist() + [delim]
        script += tokenizer.encode(f"</Thought>\n<Output>42{OUTPUT_END}") + [eos]
        self.script = np.asarray(script, dtype=np.int32)
        self.scripts = np.repeat(self.script[None, :], variants, axis=0)
        is_word = np.isin(self.script, words)
        self.scripts[:, is_word] = rng.choice(words, size=(variants, int(is_word.sum())))
        self.delims = np.flatnonzero(self.script == delim)
        self.output_end = len(self.script) - 2  # index of the last token of OUTPUT_END
        self.eos = len(self.script) - 1
        self.prompt_length = prompt_length
        length = len(self.script)
        p = rng.uniform(0.3, 0.99, size=(variants, length)).astype(np.float32)
        self.logprobs = np.log(p)
        self.top_ids = np.broadcast_to(self.scripts[:, :, None], (variants, length, TOP_K)).astype(np.int32)
        self.top_ids[:, :, 1:] = rng.choice(words, size=(variants, length, TOP_K - 1))
        rest = np.log((1 - p) / (TOP_K - 1))
        self.top_logprobs = np.concatenate([self.logprobs[:, :, None], np.repeat(rest[:, :, None], TOP_K - 1, 2)], 2)
        self.calls = 0
        self.busy_seconds = 0.0  # time spent inside generate (the simulated engine's own cost)

    async def generate(self, request: GenerationRequest) -> list[Chunk]:
        started = time.perf_counter()
        self.calls += 1
        start = len(request.prompt_token_ids) - self.prompt_length
        end = min(start + request.max_tokens, self.eos + 1)
        finish = FinishReason.LENGTH
        if end > self.eos:
            end, finish = self.eos + 1, FinishReason.EOS
        if OUTPUT_END in request.stop and start <= self.output_end < end:
            end, finish = self.output_end + 1, FinishReason.STOP
        if "\n\n" in request.stop:
            later = self.delims[(self.delims >= start) & (self.delims < end)]
            if len(later):
                end, finish = int(later[0]) + 1, FinishReason.STOP
        chunks = []
        for i in range(request.n):
            v = (self.calls + i) % len(self.logprobs)
            chunks.append(with_confidences(Chunk(  # as a worker does: confidences computed beside the engine
                self.scripts[v, start:end], self.logprobs[v, start:end], self.top_ids[v, start:end],
                self.top_logprobs[v, start:end], finish, len(request.prompt_token_ids))))
        self.busy_seconds += time.perf_counter() - started
        await asyncio.sleep(0)
        return chunks
