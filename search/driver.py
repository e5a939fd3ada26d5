"""The asynchronous MCTS loop over the ``Engine`` protocol.

Up to ``params.parallel`` iterations of one tree are in flight at once: each selection adds virtual loss
so the next one goes elsewhere, and whichever engine call returns first is applied first. The loop:

1. start iterations while there is room: select a leaf; a terminal leaf is valued at once; a visited leaf
   (or the root) gets an expansion request; a new child gets a rollout request (or is valued at once when
   the value function needs no rollout);
2. wait for the first engine result;
3. apply it: an expansion adds children, then simulates from the most confident new child; a rollout is
   valued and backed up;
4. stop on the iteration, token or wall-clock budget, or once the root's choice is settled.

The token budget is never exceeded: every request's ``n * max_tokens`` is reserved before it is sent.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from search import mcts
from search.params import MCTSParams, ValueKind
from search.prompts import OUTPUT_END, REFLECTION_PHRASE, extract_answer
from search.protocol import Chunk, Engine, EngineDeadError, EngineError, FinishReason, GenerationRequest, Tokenizer
from search.tree import ROOT, NodeKind, Tree
from search.values import VALUE_FUNCTIONS, Evaluation

MAX_REQUEST_FAILURES = 3
SEED_STRIDE = 1_000_003
"""Request ``i`` of a search seeded with ``s`` uses seed ``s * SEED_STRIDE + i`` (a prime, so the requests of
searches with nearby seeds never share a seed)."""


class StopReason(enum.Enum):
    ITERATIONS = "iterations"
    TOKENS = "tokens"
    SECONDS = "seconds"
    SETTLED = "settled"  # no remaining iteration could change the answer
    EXHAUSTED = "exhausted"  # every path is terminal


class SearchError(RuntimeError):
    """The search could not go on (too many failed engine requests)."""


@dataclass(slots=True)
class SearchStats:
    iterations: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0  # prompt tokens sent, once per request
    cached_prompt_tokens: int = 0  # of those, served from the engine's prefix cache
    requests: int = 0
    failed_requests: int = 0
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class SearchResult:
    tree: Tree
    path: list[int]  # node ids root..leaf, ending with a rollout when the leaf was not terminal
    response_token_ids: np.ndarray  # int32, the chosen path's generated tokens
    response: str
    answer: str | None
    value: float  # mean value of the chosen leaf (NaN when never valued)
    stop_reason: StopReason
    stats: SearchStats = field(default_factory=SearchStats)


@dataclass(frozen=True, slots=True)
class _InFlight:
    node: int
    expansion: bool
    reserved_tokens: int


ProgressCallback = Callable[["SearchStats", float], None]
"""Called after every backup with the running stats and the root's best mean child value (NaN before any)."""


async def run_mcts(engine: Engine, tokenizer: Tokenizer, prompt_token_ids, params: MCTSParams, *,
                   reference: str | None = None, request_prefix: str = "",
                   clock: Callable[[], float] = time.monotonic,
                   on_progress: ProgressCallback | None = None) -> SearchResult:
    """Search one problem; ``prompt_token_ids`` is the full prompt (system + question + assistant header)."""
    search = _Search(engine, tokenizer, prompt_token_ids, params, reference, request_prefix, clock)
    search.on_progress = on_progress
    return await search.run()


class _Search:
    """The state of one run of ``run_mcts`` (created per call, never reused)."""

    def __init__(self, engine, tokenizer, prompt_token_ids, params: MCTSParams, reference, request_prefix, clock):
        self.engine, self.tokenizer, self.params = engine, tokenizer, params
        self.reference, self.request_prefix, self.clock = reference, request_prefix, clock
        self.tree = Tree(prompt_token_ids, max_children=params.children + 1)
        self.value_fn, self.needs_rollout = VALUE_FUNCTIONS[params.value]
        self.stats = SearchStats()
        self.inflight: dict[asyncio.Task, _InFlight] = {}
        self.started = 0  # iterations begun (completed + in flight)
        self.reserved_tokens = 0
        self.token_blocked = False
        self.exhausted = False  # every leaf is terminal: more iterations would only revisit them
        self.on_progress: ProgressCallback | None = None
        self.reflection_ids = tokenizer.encode(REFLECTION_PHRASE + params.granularity.delimiter)

    async def run(self) -> SearchResult:
        start = self.clock()
        deadline = math.inf if self.params.budget.seconds is None else start + self.params.budget.seconds
        try:
            reason = await self._loop(deadline)
        finally:
            await self._cancel_all()
        self.stats.seconds = self.clock() - start
        return self._result(reason)

    async def _loop(self, deadline: float) -> StopReason:
        budget = self.params.budget
        while True:
            while (len(self.inflight) < self.params.parallel and self.started < budget.iterations
                   and not self.token_blocked and not self.exhausted and self._try_start()):
                pass
            if self.exhausted:
                return StopReason.EXHAUSTED
            if self.stats.iterations >= budget.iterations:
                return StopReason.ITERATIONS
            if self.params.early_stop and mcts.root_settled(self.tree, budget.iterations - self.stats.iterations):
                return StopReason.SETTLED
            if not self.inflight:
                return StopReason.TOKENS if self.token_blocked else StopReason.EXHAUSTED
            timeout = deadline - self.clock()
            done = set()
            if timeout > 0:
                done, _ = await asyncio.wait(self.inflight, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                return StopReason.SECONDS
            self.token_blocked = False  # finished requests free their reservations
            for task in [t for t in self.inflight if t in done]:  # launch order, so runs are reproducible
                self._apply(task, self.inflight.pop(task))

    # -- 1. starting iterations -------------------------------------------------------------------
    def _try_start(self) -> bool:
        node = mcts.select(self.tree, self.params.exploration)
        if node is None:
            return False
        self.started += 1
        n = self.tree.nodes
        if n["is_terminal"][node]:
            value = self.tree.mean_value(node) if n["visits"][node] else self._evaluate(node, None)
            self._complete(node, value)
            self.exhausted = not self.inflight and mcts.fully_explored(self.tree)
        elif node == ROOT or n["visits"][node] > 0 or (
                n["kind"][node] == NodeKind.REFLECTION and not self.needs_rollout):
            return self._request(node, expansion=True)
        else:
            return self._evaluate_new(node)
        return True

    def _evaluate_new(self, node: int) -> bool:
        """Value a new child: at once when terminal or no rollout is needed, else by a rollout request."""
        if self.tree.nodes["is_terminal"][node] or not self.needs_rollout:
            self._complete(node, self._evaluate(node, None))
            return True
        return self._request(node, expansion=False)

    def _request(self, node: int, *, expansion: bool) -> bool:
        """Send an expansion (n=k) or rollout (n=1) request; False, undoing the iteration, if unaffordable."""
        p = self.params
        room = p.max_path_tokens - self.tree.path_length(node)
        n = p.children if expansion else 1
        wanted = min(p.granularity.tokens, room) if expansion else room
        max_tokens = self._affordable(n, wanted)
        if max_tokens < 1:
            self.token_blocked = True
            self._abandon(node)
            return False
        stop = (OUTPUT_END,) + ((p.granularity.delimiter,) if expansion and p.granularity.kind == "step" else ())
        seed = None if p.seed is None else p.seed * SEED_STRIDE + self.stats.requests
        request = GenerationRequest(
            prompt_token_ids=self.tree.prompt_for(node), max_tokens=max_tokens, n=n, temperature=p.temperature,
            top_p=p.top_p, seed=seed, stop=stop, request_id=f"{self.request_prefix}{self.stats.requests}")
        self.stats.requests += 1
        self.stats.prompt_tokens += len(request.prompt_token_ids)
        self.reserved_tokens += n * max_tokens
        self.tree.nodes["pending"][node] = True
        task = asyncio.ensure_future(self.engine.generate(request))
        self.inflight[task] = _InFlight(node, expansion, n * max_tokens)
        return True

    def _affordable(self, n: int, wanted: int) -> int:
        if self.params.budget.tokens is None:
            return wanted
        available = self.params.budget.tokens - self.stats.generated_tokens - self.reserved_tokens
        return min(wanted, available // n)

    # -- 3. applying results ----------------------------------------------------------------------
    def _apply(self, task: asyncio.Task, job: _InFlight) -> None:
        self.reserved_tokens -= job.reserved_tokens
        self.tree.nodes["pending"][job.node] = False
        try:
            chunks = task.result()
        except EngineDeadError:
            raise
        except EngineError as exc:
            self.stats.failed_requests += 1
            self._abandon(job.node)
            if self.stats.failed_requests >= MAX_REQUEST_FAILURES:
                raise SearchError(f"{self.stats.failed_requests} engine requests failed; last: {exc}") from exc
            return
        self.stats.generated_tokens += sum(len(c) for c in chunks)
        self.stats.cached_prompt_tokens += chunks[0].num_cached_tokens if chunks else 0
        if job.expansion:
            self._apply_expansion(job.node, chunks)
        else:
            rollout = self.tree.add_chunk(job.node, chunks[0], kind=NodeKind.ROLLOUT)
            self.tree.nodes["is_terminal"][rollout] = True
            self._complete(job.node, self._evaluate(job.node, rollout))

    def _apply_expansion(self, node: int, chunks: list[Chunk]) -> None:
        tree = self.tree
        added = [self._add_child(node, chunk) for chunk in chunks]
        self._maybe_reflect(node, added)
        new = [child for child, _ in added]
        confidences = np.nan_to_num(tree.nodes["confidence"][new].astype(np.float64), nan=-np.inf)
        child = new[int(np.argmax(confidences))]
        tree.nodes["virtual_loss"][child] += 1  # the iteration now runs through the child
        self._evaluate_new(child)

    def _add_child(self, parent: int, chunk: Chunk) -> tuple[int, bool]:
        """Add a generated child and mark it terminal; returns (child, whether it ends the thought)."""
        tree, p = self.tree, self.params
        child = tree.add_chunk(parent, chunk)
        text = mcts.chunk_text(tree, parent, chunk.token_ids, self.tokenizer.decode)
        finished = mcts.ends_by_model(chunk, text, self.tokenizer.eos_token_id)
        tree.nodes["is_terminal"][child] = (finished or tree.nodes["depth"][child] >= p.max_depth
                                            or tree.path_length(child) >= p.max_path_tokens)
        return child, mcts.ends_thought(text, finished)

    def _maybe_reflect(self, parent: int, added: list[tuple[int, bool]]) -> None:
        """Add one reflection sibling where a new child ends the thought and the policy asks for it."""
        tree, p = self.tree, self.params
        if (mcts.has_reflection_child(tree, parent) or mcts.reflections_on_path(tree, parent) >= p.max_reflections
                or tree.nodes["depth"][parent] + 1 >= p.max_depth):
            return
        for child, thought_ends in added:
            if not thought_ends:
                continue
            answer = None
            if self.reference is not None:
                answer = extract_answer(self.tokenizer.decode(tree.path_token_ids(child).tolist()))
            if mcts.wants_reflection(p.reflection, confidence=float(tree.nodes["confidence"][child]),
                                     answer=answer, reference=self.reference):
                tree.add_forced(parent, self.reflection_ids, kind=NodeKind.REFLECTION)
                return

    # -- 2/4. valuing and backing up --------------------------------------------------------------
    def _evaluate(self, node: int, rollout: int | None) -> float:
        tree = self.tree
        answer = None
        if self.params.value is ValueKind.ANSWER_CHECK:
            ids = tree.path_token_ids(rollout if rollout is not None else node)
            answer = extract_answer(self.tokenizer.decode(ids.tolist()))
        rollout_confidence = None if rollout is None else float(tree.nodes["confidence"][rollout])
        return self.value_fn(Evaluation(float(tree.nodes["confidence"][node]), rollout_confidence, answer,
                                        self.reference))

    def _complete(self, node: int, value: float) -> None:
        mcts.backup(self.tree, node, value)
        self.stats.iterations += 1
        if self.on_progress is not None:
            self.on_progress(self.stats, mcts.best_root_value(self.tree))

    def _abandon(self, node: int) -> None:
        mcts.add_virtual_loss(self.tree, node, -1)
        self.started -= 1

    async def _cancel_all(self) -> None:
        """Cancel in-flight requests (the engine aborts them) and undo their iterations."""
        for task in self.inflight:
            task.cancel()
        if self.inflight:
            await asyncio.gather(*self.inflight, return_exceptions=True)
        for job in self.inflight.values():
            self.reserved_tokens -= job.reserved_tokens
            self.tree.nodes["pending"][job.node] = False
            self._abandon(job.node)
        self.inflight.clear()

    def _result(self, reason: StopReason) -> SearchResult:
        tree = self.tree
        path = mcts.best_path(tree, self.params.final)
        ids = tree.path_token_ids(path[-1])
        response = self.tokenizer.decode(ids.tolist())
        answer = extract_answer(response)
        if not self._finished(path[-1], response):
            # e.g. the token budget cut the chosen line's rollout short: take the best line the model finished
            answered = self._best_answered_path()
            if answered is not None:
                path, ids, response, answer = answered
        leaf = path[-1] if tree.nodes["kind"][path[-1]] != NodeKind.ROLLOUT else path[-2]
        return SearchResult(tree, path, ids, response, answer, tree.mean_value(leaf), reason, self.stats)

    def _finished(self, node: int, response: str) -> bool:
        """The line ends because the model finished its answer (not because a budget or limit cut it)."""
        return OUTPUT_END in response or self.tree.nodes["finish_reason"][node] == FinishReason.EOS

    def _best_answered_path(self):
        """(path, token ids, text, answer) of the highest-valued line the model finished with an answer."""
        tree, best, best_key = self.tree, None, None
        kinds, reasons = tree.nodes["kind"], tree.nodes["finish_reason"]
        for node in range(1, tree.num_nodes):
            if reasons[node] not in (FinishReason.STOP, FinishReason.EOS):
                continue
            ids = tree.path_token_ids(node)
            response = self.tokenizer.decode(ids.tolist())
            answer = extract_answer(response)
            if answer is None or not self._finished(node, response):
                continue
            valued = int(tree.nodes["parent"][node]) if kinds[node] == NodeKind.ROLLOUT else node
            key = (np.nan_to_num(tree.mean_value(valued), nan=-1.0), int(tree.nodes["visits"][valued]))
            if best_key is None or key > best_key:
                best, best_key = (tree.path(node), ids, response, answer), key
        return best
