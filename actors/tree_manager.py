"""TreeManager: the Ray actor that runs many search trees at once and keeps the GeneratorWorkers busy.

Every tree is an asyncio task running the configured strategy (``search.strategies``) against a ``TreeEngine``
of the manager's ``WorkerPool`` (``actors.pool``: worker affinity, in-flight bounds, failover). Finished trees
go to the sink as Arrow tables and leave the manager's memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass

from actors.pool import WorkerPool
from cluster.cpus import keep_off_engine_cores
from cluster.metrics import add
from dataset.problems import Problem
from dataset.records import error_row, node_table, preference_pairs, tree_row
from search.driver import SearchError
from search.params import MCTSParams
from search.prompts import MIN_GENERATION_ROOM, prompt_token_ids
from search.protocol import EngineError
from search.strategies import get_strategy

log = logging.getLogger(__name__)

MAX_CONCURRENCY = 10_000  # Ray's cap on one manager's concurrent calls; its max_active_trees bound is lower


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
    max_active_trees: int
    max_in_flight_per_worker: int
    strategy: str = "mcts"  # a name in search.strategies.STRATEGIES
    cpu_engines: int = 0  # CPU engines pinned on the workers' node (cluster.cpus): the manager keeps off their cores


class TreeManager:
    """The actor (started by ``deploy.build`` with ``max_concurrency=MAX_CONCURRENCY``); ``run`` searches one
    problem and hands the tree to the sink."""

    def __init__(self, workers: list, sink, settings: ManagerSettings, value_workers: list | None = None):
        from actors.tokenizer import HFTokenizer
        from cluster.metrics import ForestMetrics

        keep_off_engine_cores(settings.cpu_engines)
        self.settings, self.sink = settings, sink
        self.strategy = get_strategy(settings.strategy)
        self.tokenizer = HFTokenizer(settings.model_dir)
        self.metrics = ForestMetrics()
        self.name = uuid.uuid4().hex[:8]
        self.pool = WorkerPool(workers, max_in_flight=settings.max_in_flight_per_worker, metrics=self.metrics,
                               value_workers=value_workers or ())
        self.active = asyncio.Semaphore(settings.max_active_trees)
        self.waiting = self.running = self.finished = self.failed = 0
        self.requests = 0  # engine requests of the finished trees
        self._gauge()  # publish zeros, so dashboards show the manager before its first tree
        self._cpu_start = time.process_time()  # after start-up: what the manager's own core spends on trees

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
        prompt = prompt_token_ids(self.tokenizer, problem.question, system_prompt=s.system_prompt)
        room = s.max_model_len - len(prompt)
        if room < MIN_GENERATION_ROOM:
            return await self._fail(problem, "prompt", f"prompt has {len(prompt)} tokens; max_model_len="
                                    f"{s.max_model_len} leaves {room} (< {MIN_GENERATION_ROOM}) to generate")
        params = dataclasses.replace(s.params, max_path_tokens=min(s.params.max_path_tokens, room))
        tree_id = uuid.uuid4().hex[:16]
        try:
            result = await self.pool.search(self.strategy, self.tokenizer, prompt, params, reference=problem.answer,
                                            request_prefix=f"{tree_id}-")
        except (SearchError, EngineError, asyncio.TimeoutError) as exc:
            return await self._fail(problem, "search", f"{type(exc).__name__}: {exc}")
        decode = self.tokenizer.decode
        nodes = node_table(result.tree, run_id=s.run_id, tree_id=tree_id, decode=decode)
        row = tree_row(result, problem, run_id=s.run_id, tree_id=tree_id, strategy=s.strategy,
                       model=s.model_dir, config_hash_=s.config_hash)
        pairs = preference_pairs(result, problem, run_id=s.run_id, tree_id=tree_id, decode=decode)
        await self.sink.add_tree.remote(nodes, row, pairs)
        self.finished += 1
        self.requests += result.stats.requests
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
        """Counts, and ``cpu_seconds``: the CPU time of the manager's process since start-up (all its threads, Ray's
        included), the figure that says how many workers one manager can feed."""
        return {"waiting": self.waiting, "running": self.running, "finished": self.finished, "failed": self.failed,
                "in_flight": list(self.pool.in_flight), "alive": list(self.pool.alive),
                "worker_restarts": self.pool.restarts, "requests": self.requests,
                "cpu_seconds": time.process_time() - self._cpu_start}
