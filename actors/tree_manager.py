"""TreeManager: runs many search trees at once and keeps the GeneratorWorkers busy.

Every tree is an asyncio task running ``search.run_mcts`` against a ``TreeEngine``, which sends the tree's
requests to one worker (affinity: its prefix-cache hits) through a ``WorkerPool`` that bounds the requests
in flight per worker (never ``ActorPool``, which allows one call per actor). A worker that dies has its
failed requests re-sent to the others; since a request is re-sent only after its first attempt failed,
no result can arrive twice. Dead workers are probed and rejoin once Ray has restarted them.
Finished trees go to the sink as Arrow tables and leave the manager's memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass

from actors.generator import RemoteEngine
from actors.records import Problem, error_row, node_table, preference_pairs, tree_row
from cluster.metrics import add
from search.driver import SearchError, run_mcts
from search.params import MCTSParams
from search.prompts import build_prompt
from search.protocol import Chunk, EngineDeadError, EngineError, GenerationRequest

log = logging.getLogger(__name__)

PROBE_SECONDS = 2.0
REVIVE_TIMEOUT_SECONDS = 900.0
MIN_GENERATION_ROOM = 16  # a prompt must leave at least this many tokens of context to generate into


class WorkerPool:
    """Live workers, an in-flight request budget per worker, and revival of dead ones."""

    def __init__(self, workers: list, *, max_in_flight: int, metrics=None, engine_for=RemoteEngine):
        self.workers = list(workers)
        self.engine_for = engine_for  # worker -> Engine; RemoteEngine for actor handles
        self.metrics = metrics  # cluster.metrics.ForestMetrics, or None
        self.slots = [asyncio.Semaphore(max_in_flight) for _ in workers]
        self.alive = [True] * len(workers)
        self.in_flight = [0] * len(workers)
        self.trees = [0] * len(workers)
        self.restarts = 0
        if metrics:
            metrics.set(metrics.worker_restarts, 0)
            for index in range(len(workers)):
                self._count_in_flight(index, 0)
        self._revived = asyncio.Event()
        self._probing: set[int] = set()

    def assign(self) -> int:
        """The live worker with the fewest active trees (a new tree's home)."""
        live = [i for i in range(len(self.workers)) if self.alive[i]] or list(range(len(self.workers)))
        return min(live, key=lambda i: (self.trees[i], self.in_flight[i]))

    def mark_dead(self, index: int) -> None:
        if self.alive[index]:
            log.warning("GeneratorWorker %d is down; re-sending its requests to the others", index)
            self.alive[index] = False
            self.restarts += 1
            if self.metrics:
                self.metrics.set(self.metrics.worker_restarts, self.restarts)
        if index not in self._probing:
            self._probing.add(index)
            asyncio.ensure_future(self._probe(index))

    async def _probe(self, index: int) -> None:
        import ray

        deadline = time.monotonic() + REVIVE_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            await asyncio.sleep(PROBE_SECONDS)
            try:
                await asyncio.wait_for(self.workers[index].check_health.remote(), timeout=30)
            except (ray.exceptions.RayError, EngineError, asyncio.TimeoutError):
                continue
            log.info("GeneratorWorker %d is back", index)
            self.alive[index] = True
            self._revived.set()
            self._revived = asyncio.Event()
            break
        self._probing.discard(index)

    async def wait_for_any(self) -> None:
        if not any(self.alive):
            await asyncio.wait_for(self._revived.wait(), timeout=REVIVE_TIMEOUT_SECONDS)

    async def generate(self, index: int, request: GenerationRequest) -> list[Chunk]:
        async with self.slots[index]:
            self._count_in_flight(index, +1)
            start = time.monotonic()
            try:
                chunks = await self.engine_for(self.workers[index]).generate(request)
            finally:
                self._count_in_flight(index, -1)
            if self.metrics:
                m = self.metrics
                m.chunk_latency.observe(time.monotonic() - start)
                add(m.generated_tokens, sum(len(c) for c in chunks))
                add(m.prompt_tokens, len(request.prompt_token_ids))
                add(m.cached_prompt_tokens, chunks[0].num_cached_tokens if chunks else 0)
                add(m.expansions, int(request.n > 1))
            return chunks

    def _count_in_flight(self, index: int, delta: int) -> None:
        self.in_flight[index] += delta
        if self.metrics:
            self.metrics.set(self.metrics.in_flight, self.in_flight[index], tags={"worker": str(index)})


class TreeEngine:
    """The ``Engine`` one tree sees: its home worker, failing over to live ones when that worker dies."""

    def __init__(self, pool: WorkerPool):
        self.pool = pool
        self.home = pool.assign()
        pool.trees[self.home] += 1

    async def generate(self, request: GenerationRequest) -> list[Chunk]:
        for _ in range(2 * len(self.pool.workers) + 2):
            await self.pool.wait_for_any()
            if not self.pool.alive[self.home]:
                self._move(self.pool.assign())
            worker = self.home
            try:
                return await self.pool.generate(worker, request)
            except EngineDeadError:
                self.pool.mark_dead(worker)
        raise EngineDeadError("no GeneratorWorker could serve the request")

    def _move(self, worker: int) -> None:
        self.pool.trees[self.home] -= 1
        self.home = worker
        self.pool.trees[worker] += 1

    def close(self) -> None:
        self.pool.trees[self.home] -= 1


@dataclass(frozen=True, slots=True)
class TreeOutcome:
    problem_id: str
    ok: bool
    tokens: int = 0
    seconds: float = 0.0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ManagerSettings:
    """What a TreeManager needs besides its workers and sink (plain values, built from the config)."""

    model_dir: str
    params: MCTSParams
    system_prompt: str
    max_model_len: int
    run_id: str
    config_hash: str
    max_active_trees: int = 64
    max_in_flight_per_worker: int = 128


class TreeManagerImpl:
    """The actor's body; ``run`` searches one problem and hands the tree to the sink."""

    def __init__(self, workers: list, sink, settings: ManagerSettings):
        from actors.tokenizer import HFTokenizer
        from cluster.metrics import ForestMetrics

        self.settings, self.sink = settings, sink
        self.tokenizer = HFTokenizer(settings.model_dir)
        self.metrics = ForestMetrics()
        self.name = uuid.uuid4().hex[:8]
        self.pool = WorkerPool(workers, max_in_flight=settings.max_in_flight_per_worker, metrics=self.metrics)
        self.active = asyncio.Semaphore(settings.max_active_trees)
        self.waiting = self.running = self.finished = self.failed = 0
        self._gauge()  # publish zeros, so dashboards show the manager before its first tree

    async def run(self, problem: Problem) -> TreeOutcome:
        self._gauge(waiting=+1)
        async with self.active:
            self._gauge(waiting=-1, running=+1)
            try:
                return await self._search(problem)
            finally:
                self._gauge(running=-1)

    def _gauge(self, *, waiting: int = 0, running: int = 0) -> None:
        self.waiting += waiting
        self.running += running
        tags = {"manager": self.name}
        self.metrics.set(self.metrics.queue_depth, self.waiting, tags=tags)
        self.metrics.set(self.metrics.trees_active, self.running, tags=tags)

    async def _search(self, problem: Problem) -> TreeOutcome:
        s = self.settings
        prompt = self.tokenizer.encode(build_prompt(problem.question, system_prompt=s.system_prompt))
        room = s.max_model_len - len(prompt)
        if room < MIN_GENERATION_ROOM:
            return await self._fail(problem, "prompt", f"prompt has {len(prompt)} tokens; max_model_len="
                                    f"{s.max_model_len} leaves {room} (< {MIN_GENERATION_ROOM}) to generate")
        params = dataclasses.replace(s.params, max_path_tokens=min(s.params.max_path_tokens, room))
        tree_id = uuid.uuid4().hex[:16]
        engine = TreeEngine(self.pool)
        try:
            result = await run_mcts(engine, self.tokenizer, prompt, params, reference=problem.answer,
                                    request_prefix=f"{tree_id}-")
        except (SearchError, EngineError, asyncio.TimeoutError) as exc:
            return await self._fail(problem, "search", f"{type(exc).__name__}: {exc}")
        finally:
            engine.close()
        decode = self.tokenizer.decode
        nodes = node_table(result.tree, run_id=s.run_id, tree_id=tree_id, decode=decode)
        row = tree_row(result, problem, run_id=s.run_id, tree_id=tree_id, strategy="mcts",
                       model=s.model_dir, config_hash_=s.config_hash)
        pairs = preference_pairs(result, problem, run_id=s.run_id, tree_id=tree_id, decode=decode)
        await self.sink.add_tree.remote(nodes, row, pairs)
        self.finished += 1
        self.metrics.trees.inc(tags={"status": "finished"})
        add(self.metrics.iterations, result.stats.iterations)
        return TreeOutcome(problem.problem_id, True, result.stats.generated_tokens, result.stats.seconds)

    async def _fail(self, problem: Problem, stage: str, message: str) -> TreeOutcome:
        self.failed += 1
        self.metrics.trees.inc(tags={"status": "failed"})
        log.warning("problem %s failed at %s: %s", problem.problem_id, stage, message)
        await self.sink.add_errors.remote([error_row(self.settings.run_id, problem.problem_id, stage, message)])
        return TreeOutcome(problem.problem_id, False, error=message)

    def stats(self) -> dict:
        return {"waiting": self.waiting, "running": self.running, "finished": self.finished, "failed": self.failed,
                "in_flight": list(self.pool.in_flight), "alive": list(self.pool.alive),
                "worker_restarts": self.pool.restarts}
