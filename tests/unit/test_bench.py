"""``forest bench``'s parts that need no model: the SIMULATED canned engine, the level-synchronous barrier, the
manager and memory figures, and the JSON lines."""

import asyncio
import json

import numpy as np
import pytest

from bench.benchmarks import (
    ENGINE_BENCH_TREES_PER_ACTIVE,
    RAW_TOKEN_BYTES,
    Figure,
    bench_memory,
    engine_bench_problems,
    fastest_setting,
    run_bench,
    setting_replay_requests,
)
from bench.engines import CannedEngine, LevelSyncEngine, RecordingEngine, RequestLog
from search import Budget, MCTSParams, build_prompt, run_mcts
from search.simulated import SimulatedEngine, SimulatedTokenizer
from search.params import Granularity
from search.protocol import GenerationRequest

TOK = SimulatedTokenizer()


def test_canned_engine_cuts_steps_and_answers_from_its_script():
    prompt = TOK.encode(build_prompt("q"))
    engine = CannedEngine(TOK, prompt_length=len(prompt), steps=3, step_tokens=5)

    def ask(ids, **kw):
        return asyncio.run(engine.generate(GenerationRequest(np.asarray(ids, np.int32), **kw)))

    (step,) = ask(prompt, max_tokens=100, stop=("</Output>", "\n\n"))
    assert TOK.decode(step.token_ids.tolist()).endswith("\n\n") and len(step) == 1 + 5 + 1
    (rest,) = ask(prompt + step.token_ids.tolist(), max_tokens=1000, stop=("</Output>",))
    assert TOK.decode(rest.token_ids.tolist()).endswith("<Output>42</Output>")
    two = ask(prompt, max_tokens=4, n=2)
    assert [len(c) for c in two] == [4, 4] and not np.array_equal(two[0].logprobs, two[1].logprobs)


def test_mcts_on_the_canned_engine_finds_the_answer():
    prompt = TOK.encode(build_prompt("q"))
    engine = CannedEngine(TOK, prompt_length=len(prompt))
    params = MCTSParams(granularity=Granularity.parse("mini_step:64"), budget=Budget(iterations=8))
    result = asyncio.run(run_mcts(engine, TOK, prompt, params))
    assert result.answer == "42" and result.stats.iterations == 8


def test_level_sync_engine_releases_a_level_only_when_every_tree_has_asked():
    inner = SimulatedEngine(TOK)
    log = RequestLog()
    trees = 5
    barrier = LevelSyncEngine(RecordingEngine(inner, log), trees)
    params = MCTSParams(budget=Budget(iterations=4), parallel=1)

    async def go():
        async def one(i):
            try:
                return await run_mcts(barrier, TOK, TOK.encode(build_prompt(f"q{i}")), params)
            finally:
                barrier.tree_done()
        return await asyncio.gather(*(one(i) for i in range(trees)))

    results = asyncio.run(go())
    assert all(r.stats.iterations >= 1 for r in results)
    assert log.peak_in_flight == trees  # each batch is one request per tree, all at once
    assert barrier.batches < len(log.requests)


def test_manager_and_memory_figures(capsys):
    (one,) = run_bench("manager", None, problems=0, block_sizes=[], trees=12, active=12, granularity="mini_step:64",
                       managers=[1])
    assert one.figure == "expansions_per_s" and one.value > 0 and one.context["managers"] == 1
    assert one.context["cpu"] and one.context["cpu"] != "unknown" and one.context["cores"] >= 1  # rates per CPU
    per_token, rss = bench_memory(active=20, granularity="mini_step:64")
    assert per_token.figure == "bytes_per_token_ratio" and per_token.context["raw_bytes_per_token"] == 48
    assert RAW_TOKEN_BYTES == 48 and 1.0 <= per_token.value < 1.25  # capacity grows by 1/8, never doubles
    assert rss.figure == "rss_ratio" and rss.value > 0
    line = json.loads(one.line(as_json=True))
    assert {"bench", "figure", "value", "managers"} <= set(line)


def test_figure_lines():
    figure = Figure("cache", "cached_prompt_fraction", 0.9, {"block_size": 32})
    assert json.loads(figure.line(True)) == {"bench": "cache", "figure": "cached_prompt_fraction", "value": 0.9,
                                             "block_size": 32}
    assert "block_size=32" in figure.line(False)


def test_request_log_mean_in_flight_is_time_weighted(monkeypatch):
    times = iter([0.0, 1.0, 3.0, 4.0])  # 1 in flight for 1 s, 2 for 2 s, 1 for 1 s
    monkeypatch.setattr("bench.engines.time.monotonic", lambda: next(times))
    log = RequestLog()
    for delta in (+1, +1, -1, -1):
        log.change_in_flight(delta)
    assert log.peak_in_flight == 2 and log.in_flight == 0
    assert log.mean_in_flight == (1 * 1 + 2 * 2 + 1 * 1) / 4


def test_search_all_keeps_at_most_active_trees_in_flight():
    from bench.benchmarks import _search_all

    log = RequestLog()
    engine = RecordingEngine(SimulatedEngine(TOK), log)
    prompts = [TOK.encode(build_prompt(f"q{i}")) for i in range(6)]
    params = MCTSParams(budget=Budget(iterations=3), parallel=1)
    _, results = asyncio.run(_search_all(lambda i: engine, TOK, prompts, params, active=2))
    assert len(results) == 6 and all(r.stats.iterations >= 1 for r in results)
    assert log.peak_in_flight == 2  # one request per tree, two trees at a time
    _, _ = asyncio.run(_search_all(lambda i: engine, TOK, prompts, params))
    assert log.peak_in_flight == 6  # all at once by default


def test_engine_bench_refuses_zero_repeats(capsys):
    from deploy.cli import main

    assert main(["bench", "engine", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err


def test_the_train_bench_times_the_bundled_recipe_whole_in_pieces_under_bf16_and_compiled(capsys):
    from cluster.config import load_config
    from deploy.cli import main
    from deploy.flags import DEFAULT_CONFIG
    from modelkit.arithmetic import Distribution

    harder = Distribution.parse(["max_count=9999", "max_bags=49", "max_bag_size=49"])
    pieces, bf16, compiled = run_bench("train", load_config(DEFAULT_CONFIG), problems=None, block_sizes=[], trees=0,
                                       active=0, granularity="", managers=[], train_steps=2, batch_size=8,
                                       micro_batches=4, dist=harder)
    assert (pieces.figure, bf16.figure, compiled.figure) == ("micro_batches_speedup", "bf16_speedup",
                                                             "compile_speedup")
    seconds = pieces.context["seconds_per_step"]
    assert set(seconds) == {"whole", "pieces", "pieces_bf16", "pieces_compiled"}
    assert all(s > 0 for s in seconds.values())
    assert pieces.value == pytest.approx(seconds["whole"] / seconds["pieces"], rel=0.01)
    assert compiled.value == pytest.approx(seconds["pieces"] / seconds["pieces_compiled"], rel=0.01)
    assert pieces.context["distribution"]["max_count"] == 9999 and pieces.context["cores"] >= 1
    assert main(["bench", "train", "--micro-batches", "0"]) == 2
    assert "--micro-batches must be >= 1, got 0" in capsys.readouterr().err
    assert main(["bench", "train", "--distribution", "max_piles=x"]) == 2
    assert "forest bench: --distribution: max_piles takes an integer" in capsys.readouterr().err


def test_the_fastest_setting_is_the_best_median_not_the_best_single_rate():
    rates = {"float32/eager": [2900.0, 3000.0, 3100.0], "float32/compiled": [2500.0, 3600.0, 2600.0]}
    assert fastest_setting(rates) == ("float32/eager", 3000.0)  # compiled's one fast round is not its rate
    assert fastest_setting({"a": [1.0], "b": [2.0]}) == ("b", 2.0)


def test_the_engine_bench_searches_many_times_the_active_trees_unless_told():
    """The drain at a run's end weighs as in a build only with many more trees than the active limit."""
    assert engine_bench_problems(None, 64) == ENGINE_BENCH_TREES_PER_ACTIVE * 64
    assert ENGINE_BENCH_TREES_PER_ACTIVE >= 10  # at 3x the drain was a sixth of the run
    assert engine_bench_problems(100, 64) == 100


def test_engine_settings_replay_the_first_share_of_the_requests_and_never_none():
    requests = list(range(103))
    replayed = setting_replay_requests(requests)
    assert replayed == requests[:len(replayed)] and 0 < len(replayed) < len(requests)
    assert setting_replay_requests([7]) == [7]
