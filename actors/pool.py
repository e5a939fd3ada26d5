"""The worker pool: the one place that starts (or attaches to) GeneratorWorkers and sends them requests.

- ``open_pool(config)``: every app's way in (build, serve, eval, search, bench). It connects to Ray, resolves
  ``auto`` counts, starts the workers (or attaches to the running ones named in ``attach_workers``), waits until
  they answer, and stops the workers it started in ``finally``.
- ``WorkerPool``: live workers, a bound on the requests in flight per worker (never ``ActorPool``, which allows one
  call per actor), and revival of dead workers once Ray has restarted them; value requests (``score``) go to the
  ValueWorkers, when ``value_model`` is configured.
- ``TreeEngine``: the ``Engine`` one search sees: its home worker (prefix-cache affinity), failing over to live
  ones when that worker dies. A request is re-sent only after its first attempt failed, so no result can arrive
  twice.
- ``RemoteEngine``: the ``Engine`` protocol over one worker's actor handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from actors.generator import GeneratorWorker
from actors.value_input import Likelihood, ValueInput
from actors.value_worker import ValueWorker
from actors.vllm_engine import is_causal_lm
from cluster.config import ForestConfig, LikelihoodConfig
from cluster.cpus import allowed_cores, keep_off_engine_cores, pin
from cluster.metrics import add
from search.driver import SearchResult
from search.params import ConfigError, MCTSParams
from search.protocol import Chunk, EngineDeadError, EngineError, GenerationRequest, ScoreRequest
from search.strategies import Strategy

log = logging.getLogger(__name__)

PROBE_SECONDS = 2.0  # how often a dead worker is asked whether it is back
PROBE_TIMEOUT_SECONDS = 30.0  # one health check of a restarting worker
REVIVE_TIMEOUT_SECONDS = 900.0  # give up on a dead worker (and on waiting for any) after this long
START_TIMEOUT_SECONDS = 900.0  # a new engine loads its model and warms up within this
WORKER_MAX_RESTARTS = 3
WORKER_MAX_CONCURRENCY = 1000  # Ray's cap on one async actor's concurrent calls; the pool's bound is lower


class RemoteEngine:
    """The ``Engine`` protocol over a GeneratorWorker actor handle (and ``Scorer`` over a ValueWorker's).

    Cancelling ``generate`` cancels the actor task, which aborts the request in vLLM. A dead or restarting
    actor surfaces as ``EngineDeadError``; a failed request as ``EngineError``.
    """

    def __init__(self, actor):
        self.actor = actor

    async def generate(self, request: GenerationRequest) -> list[Chunk]:
        return await self._call(self.actor.generate, request)

    async def score(self, request: ScoreRequest):
        return await self._call(self.actor.score, request)

    @staticmethod
    async def _call(method, request):
        import ray

        ref = method.remote(request)
        try:
            return await ref
        except asyncio.CancelledError:
            ray.cancel(ref)
            raise
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, EngineDeadError):
                raise EngineDeadError(str(cause)) from exc
            if isinstance(cause, EngineError):
                raise EngineError(str(cause)) from exc
            raise
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            raise EngineDeadError(f"worker unavailable: {exc}") from exc


def start_generator_workers(config, count: int, *, name_prefix: str | None = None,
                            actor_class: type = GeneratorWorker, cpu_slots: tuple[int, int] | None = None,
                            **worker_options) -> list:
    """Start ``count`` workers (``config`` is an ``EngineConfig``) with distinct seeds, placed by
    ``cluster.placement``. Named ``{name_prefix}-worker-{i}`` when a prefix is given (so operators and other runs
    can find them). ``actor_class`` may be a subclass of ``GeneratorWorker`` (the benchmarks add a replay), or
    ``ValueWorker``. ``cpu_slots``: (the first worker's slot, CPU engines on the node) to pin CPU engines by
    (``cluster.cpus``); None: none is pinned. ``worker_options`` go to every worker's constructor."""
    import ray

    from cluster.placement import worker_placement

    device = config.resolved_device(ray.cluster_resources().get("GPU", 0.0))
    remote_class = ray.remote(actor_class)
    workers = []
    for index in range(count):
        options = worker_placement(config, device=device, index=index)
        name = f"{name_prefix}-worker-{index}" if name_prefix else None
        actor = remote_class.options(max_restarts=WORKER_MAX_RESTARTS, max_task_retries=0,
                                     max_concurrency=WORKER_MAX_CONCURRENCY, name=name, **options)
        slot = None if cpu_slots is None else (cpu_slots[0] + index, cpu_slots[1])
        workers.append(actor.remote(config, config.seed + index, device, cpu_slot=slot, **worker_options))
    return workers


def _pinned_engines(config: ForestConfig, generators: int, values: int) -> int:
    """How many of the engines about to start are CPU engines to pin (``engine.pin_cpus``): the generators first,
    then the value models. On one node, as CPU builds run; 0 when any engine is on a GPU."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0.0)
    engines = [(config.engine, generators)] + ([(config.value_model, values)] if values else [])
    if any(e.resolved_device(gpus) != "cpu" or not e.pin_cpus for e, count in engines if count):
        return 0
    return generators + values


def value_input(config: ForestConfig) -> ValueInput | None:
    """What the ValueWorkers need to render their PRM's own input, when ``value_input`` is configured."""
    spec = config.value_input
    if spec is None:
        return None
    return ValueInput(policy_model=config.engine.model, step_separator=spec.step_separator,
                      step_delimiter=config.search.step_delimiter, system_prompt=spec.system_prompt)


def likelihood(config: ForestConfig) -> Likelihood | None:
    """What the ValueWorkers need to serve a verifier by likelihood: when ``value_likelihood`` is configured, or the
    value model is a causal LM (then with the default spans)."""
    spec = config.value_likelihood
    if spec is None and (config.value_model is None or not is_causal_lm(config.value_model.model)):
        return None
    if config.value_input is not None:  # value_likelihood with value_input is refused by the config already
        raise ConfigError("value_input", config.value_input.step_separator, f"is a reward model's input format; "
                          f"{config.value_model.model} is a causal LM, read as a verifier by likelihood")
    return Likelihood(policy_model=config.engine.model, spans=(spec or LikelihoodConfig()).spans)


@dataclass
class Pool:
    """What ``open_pool`` gives an app: the resolved config, the worker handles, the model's tokenizer."""

    config: ForestConfig
    workers: list
    value_workers: list = field(default_factory=list)
    cpu_engines: int = 0  # CPU engines pinned to cores of their own (cluster.cpus); this process searches off them
    _cores: list[int] | None = field(default=None, repr=False)  # this process's cores before worker_pool pinned it

    @functools.cached_property
    def tokenizer(self):
        from actors.tokenizer import HFTokenizer
        return HFTokenizer(self.config.engine.model)

    def worker_pool(self, metrics=None) -> "WorkerPool":
        """A ``WorkerPool`` over the workers for this process's event loop (which searches, so it moves off the
        engines' cores until the pool closes)."""
        if self.cpu_engines and self._cores is None:
            self._cores = allowed_cores()
            keep_off_engine_cores(self.cpu_engines)
        return WorkerPool(self.workers, max_in_flight=self.config.max_in_flight_per_worker, metrics=metrics,
                          value_workers=self.value_workers)

    def unpin(self) -> None:
        """This process back on the cores it had before ``worker_pool``."""
        if self._cores:
            pin(os.getpid(), self._cores)
            self._cores = None


@contextlib.contextmanager
def open_pool(config: ForestConfig, *, name_prefix: str | None = None, actor_class: type = GeneratorWorker,
              start: bool = True, value: bool = True) -> Iterator[Pool]:
    """Connect, start or attach the workers, wait until they answer; stop the ones started here on exit.

    ``start=False`` connects and resolves the config but starts nothing (a build with nothing left to do).
    ValueWorkers start when ``value_model`` is configured, unless ``value=False`` (a run that never scores).
    """
    import ray

    from cluster.placement import resolve_auto
    from cluster.runtime import connect

    connect()
    config = resolve_auto(config)
    owned, pool = [], None
    try:
        workers, value_workers = [], []
        generators = config.workers if start and not config.attach_workers else 0
        values = config.value_workers if start and value and config.value_model is not None else 0
        engines = _pinned_engines(config, generators, values)
        if start and config.attach_workers:
            workers = [ray.get_actor(name) for name in config.attach_workers]
        elif start:
            workers = start_generator_workers(config.engine, config.workers, name_prefix=name_prefix,
                                              actor_class=actor_class, cpu_slots=(0, engines) if engines else None)
            owned += workers
        if values:
            value_workers = start_generator_workers(
                config.value_model, config.value_workers, actor_class=ValueWorker,
                name_prefix=f"{name_prefix}-value" if name_prefix else None,
                cpu_slots=(generators, engines) if engines else None, value_input=value_input(config),
                likelihood=likelihood(config))
            owned += value_workers
        if owned:  # engine start-up is its own phase, so the first throughput figures of a run exclude it
            log.info("starting %d engine(s) (%s) ...", len(owned),
                     ", ".join(sorted({config.engine.model, *([config.value_model.model] if value_workers else [])})))
        started = time.monotonic()
        ray.get([w.check_health.remote() for w in workers + value_workers], timeout=START_TIMEOUT_SECONDS)
        if owned:
            log.info("%d engine(s) ready in %.1f s", len(owned), time.monotonic() - started)
        pool = Pool(config, workers, value_workers, cpu_engines=engines)
        yield pool
    finally:
        for worker in owned:
            ray.kill(worker)
        if pool is not None:
            pool.unpin()


class WorkerPool:
    """Live workers, an in-flight request budget per worker, and revival of dead ones."""

    def __init__(self, workers: list, *, max_in_flight: int, metrics=None, engine_for=RemoteEngine,
                 value_workers: Sequence = ()):
        self.workers = list(workers)
        self.value_workers = list(value_workers)
        self.value_slots = [asyncio.Semaphore(max_in_flight) for _ in self.value_workers]
        self._next_value = 0
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
        self._probes: dict[int, asyncio.Task] = {}  # worker index -> its probe (a reference keeps it alive)

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
        if index not in self._probes:
            task = asyncio.ensure_future(self._probe(index))
            self._probes[index] = task
            task.add_done_callback(functools.partial(self._probe_done, index))

    def _probe_done(self, index: int, task: asyncio.Task) -> None:
        del self._probes[index]
        if not task.cancelled() and task.exception() is not None:
            log.error("probing GeneratorWorker %d failed", index, exc_info=task.exception())

    async def _probe(self, index: int) -> None:
        import ray

        deadline = time.monotonic() + REVIVE_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            await asyncio.sleep(PROBE_SECONDS)
            try:
                await asyncio.wait_for(self.workers[index].check_health.remote(), timeout=PROBE_TIMEOUT_SECONDS)
            except (ray.exceptions.RayError, EngineError, asyncio.TimeoutError):
                continue
            log.info("GeneratorWorker %d is back", index)
            self.alive[index] = True
            self._revived.set()
            self._revived = asyncio.Event()
            return
        log.error("GeneratorWorker %d did not come back within %.0f s", index, REVIVE_TIMEOUT_SECONDS)

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

    async def score(self, request: ScoreRequest):
        """A value-model score from the ValueWorkers, in turn; a dead one is skipped, and while none answers the
        request waits for Ray to restart one (as generations wait for a GeneratorWorker), up to
        ``REVIVE_TIMEOUT_SECONDS``."""
        if not self.value_workers:
            raise EngineError("no value model is configured (value_model in the config)")
        deadline, warned = time.monotonic() + REVIVE_TIMEOUT_SECONDS, False
        while True:
            index = self._next_value % len(self.value_workers)
            self._next_value += 1
            try:
                async with self.value_slots[index]:
                    return await self.engine_for(self.value_workers[index]).score(request)
            except EngineDeadError as exc:
                if time.monotonic() > deadline:
                    raise EngineDeadError(f"no ValueWorker could score the request within "
                                          f"{REVIVE_TIMEOUT_SECONDS:.0f} s: {exc}") from exc
                if not warned:  # once per request: many wait through the same restart
                    log.warning("ValueWorker %d is down (%s); retrying until one answers", index, exc)
                    warned = True
                await asyncio.sleep(PROBE_SECONDS)

    async def search(self, strategy: Strategy, tokenizer, prompt_token_ids: Sequence[int], params: MCTSParams,
                     **kwargs) -> SearchResult:
        """Run one search with ``strategy`` on a ``TreeEngine`` of this pool (``kwargs`` go to the strategy)."""
        engine = TreeEngine(self)
        try:
            return await strategy(engine, tokenizer, prompt_token_ids, params, **kwargs)
        finally:
            engine.close()

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

    @property
    def max_attempts(self) -> int:
        """Every worker twice, and two more tries for a worker Ray restarted meanwhile."""
        return 2 * len(self.pool.workers) + 2

    async def generate(self, request: GenerationRequest) -> list[Chunk]:
        for _ in range(self.max_attempts):
            await self.pool.wait_for_any()
            if not self.pool.alive[self.home]:
                self._move(self.pool.assign())
            worker = self.home
            try:
                return await self.pool.generate(worker, request)
            except EngineDeadError:
                self.pool.mark_dead(worker)
        raise EngineDeadError("no GeneratorWorker could serve the request")

    async def score(self, request: ScoreRequest):
        return await self.pool.score(request)

    def _move(self, worker: int) -> None:
        self.pool.trees[self.home] -= 1
        self.home = worker
        self.pool.trees[worker] += 1

    def close(self) -> None:
        self.pool.trees[self.home] -= 1
