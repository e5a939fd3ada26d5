"""``forest bench``: Forest's speed and memory as ratios measured within one run (these machines are noisy).

- ``engine``: Forest's MCTS on one worker vs the same requests sent straight to the same vLLM engine (its limit).
- ``designs``: the same search and engine driven by Forest's asynchronous dispatch, a level-synchronous loop and a
  one-call-per-token loop (see ``bench.engines``).
- ``cache``: the fraction of prompt tokens vLLM served from its prefix cache during MCTS, per KV block size.
- ``manager``: expansions per second a tree manager sustains on one core with a SIMULATED engine, for 1, 2 and 4
  managers (one process each).
- ``value``: generated tokens/s of MCTS valued by the value model (``mcts-prm``, a ValueWorker beside the
  generator) over MCTS valued by token confidence (``mcts-step``): the same problems, worker and budget, one run.
- ``train``: seconds per training step of the bundled model's recipe (``modelkit.train``) whole, in micro-batches,
  and in micro-batches under bfloat16 autocast: the same weights and batches, the steps taken in turns.
- ``memory``: bytes per stored token in active trees, and the manager's peak RSS per 1,000 active trees, both over the
  raw array bytes (token id, logprob, top-5 ids and logprobs: 48 bytes a token).

Each figure is printed as one line; with ``--json`` as ``{"bench": ..., "figure": ..., "value": ..., ...context}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import resource
import time

from cluster.config import ForestConfig
from search.protocol import TOP_K
from search.strategies import STRATEGIES

BENCHES = ("engine", "designs", "cache", "value", "manager", "memory", "train")
BENCH_SEED = 2_000_000  # a held-out problem stream (see modelkit.arithmetic)
WARM_UP_TOKENS = 8  # one small request loads the engine's kernels before a timed run
SIMULATED_ITERATIONS = 32  # iterations per simulated tree (manager and memory benches)
VALUE_BENCH_BUDGET = 1024  # generated tokens per tree in the value bench (when the config sets no budget)
VALUE_BENCH_ITERATIONS = 1000  # enough that the token budget, not the iteration count, ends each tree
UNBOUNDED_IN_FLIGHT = 1 << 30  # the simulated engine has no batch limit
RAW_TOKEN_BYTES = 4 + 4 + TOP_K * (4 + 4)  # token id, sampled logprob, top-5 ids and logprobs
DEFAULT_BENCH_PROBLEMS = 32  # trees of the designs, cache and value benches
ENGINE_BENCH_TREES_PER_ACTIVE = 12
"""The engine bench's default trees, as a multiple of ``build.max_active_trees``. A run ends with a drain: once the
last tree has started, fewer trees than the limit remain and the engine's batch empties (about 3 s of an 18 s run
at 3x on 2 CPU cores). A build of thousands of trees drains once; at 12x the drain weighs about as little as there
(docs/benchmarks.md: Forest over plain vLLM 0.90-0.94 at 3x against 0.99 at 12x, measured in one script)."""
TRAIN_BENCH_STEPS, TRAIN_BENCH_BATCH, TRAIN_BENCH_MICRO_BATCHES = 16, 64, 8  # the train bench's defaults
SETTING_REPLAY_SHARE = 4
"""The engine settings replay the first 1/this of Forest's recorded requests: each setting's rate needs the same
requests as the others, not all of them, and float32 replays are slow."""
ENGINE_CANDIDATES = (("float32", True), ("float32", False), ("bfloat16", True), ("bfloat16", False))
"""(dtype, enforce_eager) settings the engine bench tries with plain vLLM, for ``default_vs_fastest_engine``."""


@dataclasses.dataclass
class Figure:
    bench: str
    figure: str
    value: float
    context: dict

    def line(self, as_json: bool) -> str:
        if as_json:
            return json.dumps({"bench": self.bench, "figure": self.figure, "value": self.value, **self.context})
        details = ", ".join(f"{k}={v}" for k, v in self.context.items())
        return f"{self.bench:<8} {self.figure:<26} {self.value:>10.3f}   {details}"


def machine() -> dict:
    """Where a figure was measured: rates per CPU-second differ from one CPU model to the next, so every figure
    names its machine's."""
    from actors.vllm_engine import cpuinfo_field

    return {"cpu": cpuinfo_field("model name") or platform.processor() or "unknown", "cores": os.cpu_count()}


def _prompts(config: ForestConfig, tokenizer, problems: int) -> list[list[int]]:
    from modelkit.arithmetic import make_problems
    from search.prompts import prompt_token_ids

    return [prompt_token_ids(tokenizer, p.question, system_prompt=config.search.system_prompt)
            for p in make_problems(problems, BENCH_SEED)]


def _one_worker(config: ForestConfig, **engine_overrides):
    """``open_pool`` with one new ``ReplayWorker`` (engine settings overridden), never an attached one."""
    from actors.pool import open_pool
    from bench.replay import ReplayWorker

    engine = config.engine.model_copy(update=engine_overrides)
    return open_pool(config.model_copy(update={"workers": 1, "attach_workers": [], "engine": engine}),
                     actor_class=ReplayWorker, value=False)


async def _search_all(engine_for_tree, tokenizer, prompts, params, *, on_tree_done=None,
                      active: int | None = None) -> tuple[float, list]:
    """Run one MCTS per prompt, all at once or (``active``) that many at a time, a finished tree's slot going to
    the next prompt as in a build; (wall seconds, results)."""
    mcts = STRATEGIES["mcts"]
    gate = asyncio.Semaphore(active or len(prompts) or 1)

    async def one(i: int, prompt):
        try:
            async with gate:
                return await mcts(engine_for_tree(i), tokenizer, prompt, dataclasses.replace(params, seed=i))
        finally:
            if on_tree_done:
                on_tree_done()

    start = time.monotonic()
    results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return time.monotonic() - start, results


async def _forest_run(pool, prompts, params, log=None, active: int | None = None) -> tuple[float, list]:
    """Forest's own dispatch on the pool's one warmed-up worker with a cold prefix cache, ``active`` trees at a time
    (all at once by default); records requests into ``log``."""
    from actors.pool import TreeEngine
    from bench.engines import RecordingEngine

    await _warm_up(pool.workers[0], prompts[0])
    workers = pool.worker_pool()

    def engine_for_tree(_):
        return TreeEngine(workers) if log is None else RecordingEngine(TreeEngine(workers), log)

    return await _search_all(engine_for_tree, pool.tokenizer, prompts, params, active=active)


async def _warm_up(worker, prompt) -> None:
    from actors.pool import RemoteEngine
    from search.protocol import GenerationRequest

    await RemoteEngine(worker).generate(GenerationRequest(prompt, max_tokens=WARM_UP_TOKENS, n=2))
    await worker.reset_prefix_cache.remote()


def bench_engine(config: ForestConfig, *, problems: int | None = None, repeats: int = 1,
                 fastest: bool = True) -> list[Figure]:
    """Forest's tokens/s over plain vLLM's on the same requests at the same concurrency (one worker); with
    ``fastest``, also over the best plain rate among ``ENGINE_CANDIDATES``.

    Forest searches ``build.max_active_trees`` problems at a time, as a build does, ``problems`` in all
    (``ENGINE_BENCH_TREES_PER_ACTIVE`` times that by default, so that the ramp-up and the drain weigh as little as in
    a build). Each of ``repeats`` rounds runs Forest, then plain vLLM on its requests at Forest's peak concurrency at
    the engine; ``throughput_ratio`` is the median round's ratio. Rates on this VM drift by 10-15% from one minute
    to the next, so two rates from different minutes are never divided: ``default_vs_fastest_engine`` is that ratio
    times the shipped setting's plain rate over the fastest setting's, both medians of ``repeats`` replays (of
    ``setting_replay_requests``) that take turns (``_setting_rates``)."""
    import ray

    from bench.engines import RequestLog

    params = config.search.to_params()
    active = config.build.max_active_trees
    problems = engine_bench_problems(problems, active)
    rounds = []  # (Forest tokens/s, plain tokens/s, log) per round
    with _one_worker(config) as pool:
        prompts = _prompts(config, pool.tokenizer, problems)
        for _ in range(repeats):
            log = RequestLog()
            forest_seconds, _ = asyncio.run(_forest_run(pool, prompts, params, log, active=active))
            rounds.append((log.generated_tokens / forest_seconds,
                           _replay_rate(pool, log.requests, _engine_peak(config, log)), log))
        shipped = ray.get(pool.workers[0].engine_settings.remote())
    forest_rate, plain_rate, log = sorted(rounds, key=lambda r: r[0] / r[1])[len(rounds) // 2]  # the median round
    ratio = forest_rate / plain_rate
    shipped_name = _setting_name(shipped["dtype"], shipped["enforce_eager"])
    figures = [Figure("engine", "throughput_ratio", round(ratio, 3), {
        "forest_tokens_per_s": round(forest_rate, 1), "plain_vllm_tokens_per_s": round(plain_rate, 1),
        "rounds": [round(f / p, 3) for f, p, _ in rounds],
        "requests": len(log.requests), "concurrency": _engine_peak(config, log),
        "mean_in_flight": round(log.mean_in_flight, 1), "trees": len(prompts), "active_trees": active,
        "forest_tokens": log.generated_tokens, "model": config.engine.model, "setting": shipped_name,
        "dtype": shipped["dtype"], "enforce_eager": shipped["enforce_eager"]})]
    if fastest:
        settings = [(shipped["dtype"], shipped["enforce_eager"])]
        settings += [s for s in ENGINE_CANDIDATES if _setting_name(*s) != shipped_name]
        rates = _setting_rates(config, settings, setting_replay_requests(log.requests), _engine_peak(config, log),
                               prompts[0], repeats)
        best, best_rate = fastest_setting(rates)
        shipped_rate = _median(rates[shipped_name])
        figures.append(Figure("engine", "default_vs_fastest_engine", round(ratio * shipped_rate / best_rate, 3), {
            "throughput_ratio": round(ratio, 3), "shipped_over_fastest": round(shipped_rate / best_rate, 3),
            "shipped": shipped_name, "fastest_setting": best, "fastest_plain_tokens_per_s": round(best_rate, 1),
            "plain_tokens_per_s": {name: [round(r, 1) for r in values] for name, values in rates.items()}}))
    return figures


def engine_bench_problems(problems: int | None, active: int) -> int:
    """The engine bench's trees: ``problems``, or ``ENGINE_BENCH_TREES_PER_ACTIVE`` times the active limit."""
    return problems or ENGINE_BENCH_TREES_PER_ACTIVE * active


def setting_replay_requests(requests: list) -> list:
    """The recorded requests every engine setting replays: the first ``1/SETTING_REPLAY_SHARE`` (at least one)."""
    return requests[:max(1, len(requests) // SETTING_REPLAY_SHARE)]


def _setting_rates(config: ForestConfig, settings: list[tuple[str, bool]], requests: list, concurrency: int,
                   warm_up_prompt, repeats: int) -> dict[str, list[float]]:
    """Plain vLLM's tokens/s on ``requests`` per (dtype, enforce_eager) setting, ``repeats`` replays each, one fresh
    worker per setting. On CPUs the workers are all started first and replay in turns (rates drift over minutes);
    a GPU engine takes most of its GPU's memory, so there they run one after another."""
    import ray

    rates: dict[str, list[float]] = {_setting_name(*s): [] for s in settings}
    if config.engine.resolved_device(ray.cluster_resources().get("GPU", 0)) != "cpu":
        for dtype, eager in settings:
            with _warm_worker(config, dtype, eager, warm_up_prompt) as pool:
                rates[_setting_name(dtype, eager)] = [_replay_rate(pool, requests, concurrency)
                                                      for _ in range(repeats)]
        return rates
    with contextlib.ExitStack() as stack:
        pools = {_setting_name(dtype, eager): stack.enter_context(_warm_worker(config, dtype, eager, warm_up_prompt))
                 for dtype, eager in settings}
        for _ in range(repeats):
            for name, pool in pools.items():
                rates[name].append(_replay_rate(pool, requests, concurrency))
    return rates


@contextlib.contextmanager
def _warm_worker(config: ForestConfig, dtype: str, enforce_eager: bool, warm_up_prompt):
    """``_one_worker`` with these engine settings, warmed up."""
    with _one_worker(config, dtype=dtype, enforce_eager=enforce_eager) as pool:
        asyncio.run(_warm_up(pool.workers[0], warm_up_prompt))
        yield pool


def _engine_bench_cpus() -> int:
    """Logical CPUs of the engine bench's local cluster: this machine's, or enough for one CPU worker per
    ``ENGINE_CANDIDATES`` setting at once (they take turns, so one computes at a time)."""
    from cluster.placement import CPUS_PER_CPU_WORKER

    return max(os.cpu_count() or 1, math.ceil(len(ENGINE_CANDIDATES) * CPUS_PER_CPU_WORKER))


def _setting_name(dtype: str, enforce_eager: bool) -> str:
    return f"{dtype}/{'eager' if enforce_eager else 'compiled'}"


def _median(values: list[float]) -> float:
    """The middle value (the upper one of an even count), as the rounds of the engine bench are read."""
    return sorted(values)[len(values) // 2]


def fastest_setting(rates: dict[str, list[float]]) -> tuple[str, float]:
    """(setting, its median rate) of the setting whose median over the rounds is highest."""
    medians = {name: _median(values) for name, values in rates.items()}
    best = max(medians, key=medians.get)
    return best, medians[best]


def _engine_peak(config: ForestConfig, log) -> int:
    """The most requests Forest had at its one worker's engine: what the trees asked for at once, less those the
    pool held back (``max_in_flight_per_worker``). Plain vLLM replays at that concurrency."""
    return min(log.peak_in_flight, config.max_in_flight_per_worker)


def _replay_rate(pool, requests: list, concurrency: int) -> float:
    """Plain vLLM's generated tokens/s on ``requests`` on the pool's one worker, from a cold prefix cache."""
    import ray

    plain = ray.get(pool.workers[0].replay.remote(requests, concurrency))
    return plain["generated_tokens"] / plain["seconds"]


def bench_designs(config: ForestConfig, *, problems: int, per_token_problems: int) -> list[Figure]:
    """The same trees, engine and budget, dispatched three ways; Forest's speed-up (in generated tokens/s) over the
    other two. The one-call-per-token loop is so slow that it searches only the first ``per_token_problems``."""
    from actors.pool import RemoteEngine
    from bench.engines import LevelSyncEngine, PerTokenEngine

    params = config.search.to_params()
    runs = {}
    with _one_worker(config) as pool:
        worker, tokenizer = pool.workers[0], pool.tokenizer
        prompts = _prompts(config, tokenizer, problems)

        async def level_sync():
            await worker.reset_prefix_cache.remote()
            barrier = LevelSyncEngine(RemoteEngine(worker), len(prompts))
            return await _search_all(lambda i: barrier, tokenizer, prompts, dataclasses.replace(params, parallel=1),
                                     on_tree_done=barrier.tree_done)

        runs["forest"] = asyncio.run(_forest_run(pool, prompts, params))
        runs["level_sync"] = asyncio.run(level_sync())
    with _one_worker(config, enable_prefix_caching=False) as pool:
        no_cache = pool.workers[0]

        async def per_token():
            await _warm_up(no_cache, prompts[0])
            engine = PerTokenEngine(RemoteEngine(no_cache), tokenizer)
            return await _search_all(lambda i: engine, tokenizer, prompts[:per_token_problems], params)

        runs["per_token"] = asyncio.run(per_token())
    rates = {name: sum(r.stats.generated_tokens for r in results) / seconds
             for name, (seconds, results) in runs.items()}
    context = {f"{name}_tokens_per_s": round(rate, 1) for name, rate in rates.items()}
    context |= {f"{name}_seconds": round(seconds, 1) for name, (seconds, _) in runs.items()}
    context |= {"trees": len(prompts), "per_token_trees": min(per_token_problems, len(prompts)),
                "granularity": str(params.granularity), "parallel": params.parallel}
    return [Figure("designs", "speedup_vs_level_sync", round(rates["forest"] / rates["level_sync"], 3), context),
            Figure("designs", "speedup_vs_per_token", round(rates["forest"] / rates["per_token"], 3), context)]


def bench_cache(config: ForestConfig, *, problems: int, block_sizes: list[int]) -> list[Figure]:
    """Prompt tokens served from the prefix cache during MCTS, over all prompt tokens sent, per block size."""
    from bench.engines import RequestLog

    params = config.search.to_params()
    figures = []
    for block_size in block_sizes:
        log = RequestLog()
        with _one_worker(config, block_size=block_size) as pool:
            asyncio.run(_forest_run(pool, _prompts(config, pool.tokenizer, problems), params, log))
        figures.append(Figure("cache", "cached_prompt_fraction",
                              round(log.cached_prompt_tokens / log.prompt_tokens, 3), {
                                  "block_size": block_size, "prompt_tokens": log.prompt_tokens,
                                  "cached_prompt_tokens": log.cached_prompt_tokens,
                                  "requests": len(log.requests)}))
    return figures


def bench_value(config: ForestConfig, *, problems: int) -> list[Figure]:
    """Generated tokens/s with the value model (``mcts-prm``) over tokens/s with the token-confidence value
    (``mcts-step``): does a value request make the generator wait?"""
    from actors.pool import likelihood, open_pool
    from search.params import Budget

    if config.value_model is None:
        raise ValueError("the value bench needs value_model in the config (e.g. deploy/configs/eval.cpu.yaml)")
    budget = Budget(VALUE_BENCH_ITERATIONS, config.search.budget_tokens or VALUE_BENCH_BUDGET)
    with open_pool(config.model_copy(update={"workers": 1, "attach_workers": []})) as pool:
        prompts = _prompts(config, pool.tokenizer, problems)

        async def run(name: str, batch: list) -> tuple[float, list]:
            workers = pool.worker_pool()  # per event loop: each asyncio.run below has its own
            strategy = STRATEGIES[name]
            params = dataclasses.replace(config.search.to_params(**strategy.preset), budget=budget)
            start = time.monotonic()
            results = await asyncio.gather(*(workers.search(strategy, pool.tokenizer, prompt,
                                                            dataclasses.replace(params, seed=i))
                                             for i, prompt in enumerate(batch)))
            return time.monotonic() - start, results

        runs = {}
        for name in ("mcts-step", "mcts-prm"):
            asyncio.run(run(name, prompts[:1]))  # warm up both engines and this strategy's code path
            runs[name] = asyncio.run(run(name, prompts))
    rates = {name: sum(r.stats.generated_tokens for r in results) / seconds
             for name, (seconds, results) in runs.items()}
    _, prm_results = runs["mcts-prm"]
    return [Figure("value", "tokens_per_s_ratio", round(rates["mcts-prm"] / rates["mcts-step"], 3), {
        "value_model_tokens_per_s": round(rates["mcts-prm"]), "confidence_tokens_per_s": round(rates["mcts-step"]),
        "value_requests": sum(r.stats.value_requests for r in prm_results), "trees": len(prompts),
        "budget_tokens": budget.tokens, "value_model": config.value_model.model,
        "value_by_likelihood": likelihood(config) is not None,
        "value_device": config.value_model.device, "engine_device": config.engine.device})]


# -- the manager and memory benchmarks: SIMULATED engine, no model -------------------------------------------------

def _simulated_manager(granularity: str):
    """(tokenizer, prompt, params, canned engine, pool): a manager's parts around a SIMULATED engine."""
    from actors.pool import WorkerPool
    from bench.engines import CannedEngine
    from search.params import Budget, Granularity, MCTSParams
    from search.prompts import build_prompt
    from search.simulated import SimulatedTokenizer

    tokenizer = SimulatedTokenizer()
    prompt = tokenizer.encode(build_prompt("Simulated question 0000."))
    params = MCTSParams(granularity=Granularity.parse(granularity), children=2, parallel=4,
                        budget=Budget(iterations=SIMULATED_ITERATIONS), early_stop=False)
    canned = CannedEngine(tokenizer, prompt_length=len(prompt))
    pool = WorkerPool([canned], max_in_flight=UNBOUNDED_IN_FLIGHT, engine_for=lambda engine: engine)
    return tokenizer, prompt, params, canned, pool


async def _manager_run(trees: int, active: int, granularity: str) -> dict:
    """One manager's hot path: ``trees`` searches, ``active`` at a time, through a WorkerPool, each finished tree
    turned into its Arrow node table as the TreeManager does."""
    from dataset.records import node_table

    tokenizer, prompt, params, canned, pool = _simulated_manager(granularity)
    gate = asyncio.Semaphore(active)
    expansions = 0

    async def one(i: int):
        nonlocal expansions
        async with gate:
            result = await pool.search(STRATEGIES["mcts"], tokenizer, prompt, dataclasses.replace(params, seed=abs(i)))
            expansions += int((result.tree.nodes["num_children"][:result.tree.num_nodes] > 0).sum())
            node_table(result.tree, run_id="bench", tree_id=str(i), decode=tokenizer.decode)
            return result.stats.generated_tokens

    await one(-1)  # warm up: first-use imports (pyarrow's pandas shim) are not the manager's steady state
    expansions, canned.busy_seconds = 0, 0.0
    start = time.process_time()
    wall = time.monotonic()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(trees))))
    return {"cpu_seconds": time.process_time() - start, "wall_seconds": time.monotonic() - wall,
            "expansions": expansions, "tokens": tokens, "engine_seconds": canned.busy_seconds}


def _manager_process(args) -> dict:
    trees, active, granularity = args
    return asyncio.run(_manager_run(trees, active, granularity))


def bench_manager(*, trees: int, active: int, granularity: str, managers: list[int]) -> list[Figure]:
    """Expansions/s: one manager's rate per CPU second (the engine's simulated cost subtracted), then N managers in
    N processes at once (wall-clock aggregate, so bounded by this machine's cores)."""
    figures = []
    for count in managers:
        with multiprocessing.get_context("spawn").Pool(count) as pool:
            wall = time.monotonic()
            runs = pool.map(_manager_process, [(trees, active, granularity)] * count)
            wall = time.monotonic() - wall
        expansions = sum(r["expansions"] for r in runs)
        if count == 1:
            run = runs[0]
            manager_cpu = run["cpu_seconds"] - run["engine_seconds"]
            value = expansions / manager_cpu
            context = {"cpu_seconds": round(run["cpu_seconds"], 2), "simulated_engine_seconds":
                       round(run["engine_seconds"], 2), "tokens_per_s": round(run["tokens"] / manager_cpu)}
        else:
            value = expansions / max(r["wall_seconds"] for r in runs)
            context = {"wall_seconds": round(wall, 2), "cores": multiprocessing.cpu_count()}
        figures.append(Figure("manager", "expansions_per_s", round(value, 1), {
            "managers": count, "trees_per_manager": trees, "active_trees": active, "granularity": granularity,
            "expansions": expansions, "engine": "SIMULATED", **context}))
    return figures


def _memory_process(args) -> dict:
    """In a fresh process: grow ``active`` trees to the end of their searches and hold them all; measure."""
    active, granularity = args
    import gc
    import os

    import psutil

    tokenizer, prompt, params, _, pool = _simulated_manager(granularity)
    gc.collect()
    before = psutil.Process(os.getpid()).memory_info().rss

    async def go():
        mcts = STRATEGIES["mcts"]
        return await asyncio.gather(*(pool.search(mcts, tokenizer, prompt, dataclasses.replace(params, seed=i))
                                      for i in range(active)))

    results = asyncio.run(go())
    gc.collect()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    after = psutil.Process(os.getpid()).memory_info().rss
    tokens = sum(r.tree.num_tokens for r in results)
    token_bytes = sum(sum(a.nbytes for a in r.tree.tokens.values()) for r in results)
    tree_bytes = token_bytes + sum(sum(a.nbytes for a in r.tree.nodes.values()) for r in results)
    return {"tokens": tokens, "token_array_bytes": token_bytes, "tree_bytes": tree_bytes,
            "rss_growth": max(peak, after) - before, "nodes": sum(r.tree.num_nodes for r in results)}


def bench_memory(*, active: int, granularity: str) -> list[Figure]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        m = pool.map(_memory_process, [(active, granularity)])[0]
    raw = m["tokens"] * RAW_TOKEN_BYTES
    return [
        Figure("memory", "bytes_per_token_ratio", round(m["tree_bytes"] / raw, 3), {
            "bytes_per_token": round(m["tree_bytes"] / m["tokens"], 1), "raw_bytes_per_token": RAW_TOKEN_BYTES,
            "tokens": m["tokens"], "nodes": m["nodes"], "active_trees": active, "engine": "SIMULATED"}),
        Figure("memory", "rss_ratio", round(m["rss_growth"] / raw, 3), {
            "rss_mib_per_1000_trees": round(m["rss_growth"] / 2**20 * 1000 / active, 1),
            "raw_mib_per_1000_trees": round(raw / 2**20 * 1000 / active, 1), "active_trees": active}),
    ]


def bench_train(config: ForestConfig, *, steps: int, batch_size: int, micro_batches: int, device: str,
                dist) -> list[Figure]:
    """Training steps of ``modelkit.train`` (the bundled model's size, tokenizer and recipe) timed whole, in
    ``micro_batches`` pieces, in pieces under bfloat16 autocast, and in pieces through ``torch.compile``."""
    from transformers import PreTrainedTokenizerFast

    from modelkit.train import step_seconds

    settings = {"whole": (False, 1, False), "pieces": (False, micro_batches, False),
                "pieces_bf16": (True, micro_batches, False), "pieces_compiled": (False, micro_batches, True)}
    tokenizer = PreTrainedTokenizerFast.from_pretrained(config.engine.model)
    seconds = step_seconds(tokenizer, settings, batch_size=batch_size, dist=dist, steps=steps, device=device)
    context = {"seconds_per_step": {k: round(v, 3) for k, v in seconds.items()},
               "examples_per_s": {k: round(batch_size / v, 1) for k, v in seconds.items()},
               "batch_size": batch_size, "micro_batches": micro_batches, "steps": steps, "device": device,
               "distribution": dataclasses.asdict(dist)}
    return [Figure("train", "micro_batches_speedup", round(seconds["whole"] / seconds["pieces"], 3), context),
            Figure("train", "bf16_speedup", round(seconds["pieces"] / seconds["pieces_bf16"], 3), context),
            Figure("train", "compile_speedup", round(seconds["pieces"] / seconds["pieces_compiled"], 3), context)]


def run_bench(name: str, config: ForestConfig | None, *, problems: int | None, block_sizes: list[int], trees: int,
              active: int, granularity: str, managers: list[int], per_token_problems: int = 4,
              repeats: int = 1, train_steps: int = TRAIN_BENCH_STEPS, batch_size: int = TRAIN_BENCH_BATCH,
              micro_batches: int = TRAIN_BENCH_MICRO_BATCHES, device: str = "cpu", dist=None) -> list[Figure]:
    """The figures of bench ``name``, each with this machine's CPU model and core count in its context."""
    if name in ("engine", "designs", "cache", "value"):
        from cluster.runtime import connect
        connect(num_cpus=_engine_bench_cpus() if name == "engine" else None)
    if name != "engine":  # the engine bench's default count follows the config's active trees
        problems = problems or DEFAULT_BENCH_PROBLEMS
    if name == "engine":
        figures = bench_engine(config, problems=problems, repeats=repeats)
    elif name == "value":
        figures = bench_value(config, problems=problems)
    elif name == "designs":
        figures = bench_designs(config, problems=problems, per_token_problems=per_token_problems)
    elif name == "cache":
        figures = bench_cache(config, problems=problems, block_sizes=block_sizes)
    elif name == "train":
        from modelkit.arithmetic import DEFAULT_DISTRIBUTION
        figures = bench_train(config, steps=train_steps, batch_size=batch_size, micro_batches=micro_batches,
                              device=device, dist=dist or DEFAULT_DISTRIBUTION)
    elif name == "manager":
        figures = bench_manager(trees=trees, active=active, granularity=granularity, managers=managers)
    else:
        figures = bench_memory(active=active, granularity=granularity)
    where = machine()
    for figure in figures:
        figure.context.update(where)
    return figures
