"""The bundled trained model on real vLLM (CPU build): ``forest eval``'s strategies, the benchmark's engines,
and a build written to a local S3-compatible server (moto) through a pyarrow filesystem URI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
BUNDLED_MODEL = str(REPO / "models" / "forest-arith")
WORKER = "forest-arith-test-worker-0"


@pytest.fixture(scope="module")
def arith_config():
    from cluster.config import load_config

    return load_config(REPO / "deploy" / "configs" / "build.cpu.yaml", attach_workers=[WORKER],
                       **{"engine.dtype": "float32", "engine.max_model_len": 1024, "build.flush_trees": 4,
                          "build.flush_seconds": 1.0})


@pytest.fixture(scope="module")
def arith_worker(ray_cluster, arith_config):
    """One named GeneratorWorker with the bundled model (runs attach to it by name, as a shared pool would); the
    benchmarks' replaying subclass, so that the replay is tested on it too."""
    from actors.pool import start_generator_workers
    from bench.replay import ReplayWorker

    (worker,) = start_generator_workers(arith_config.engine, 1, name_prefix="forest-arith-test",
                                        actor_class=ReplayWorker)
    ray_cluster.get(worker.check_health.remote(), timeout=600)
    yield worker
    ray_cluster.kill(worker)


def bundled_value_engine(name: str):
    """A bundled value model (``models/<name>``) on one CPU engine in float32, beside the policy's."""
    from cluster.config import EngineConfig

    return EngineConfig(model=str(REPO / "models" / name), device="cpu", dtype="float32", max_model_len=1024,
                        enforce_eager=True, cpu_kvcache_gib=1)


def test_eval_compares_every_strategy_at_one_budget(arith_worker, arith_config):
    from dataset.problems import Problem
    from modelkit.arithmetic import HELD_OUT_SEED_START, make_problems
    from deploy.evaluate import format_table, run_eval
    from search.strategies import EVAL_STRATEGIES as STRATEGIES

    problems = [Problem(p.id, p.question, p.answer) for p in make_problems(12, HELD_OUT_SEED_START + 7)]
    seen = []
    budget = arith_config.search.max_path_tokens  # the least budget forest eval takes: one path
    reports = run_eval(arith_config, problems, list(STRATEGIES), budgets=[budget], concurrency=12,
                       on_report=seen.append)
    assert [r.strategy for r in reports] == list(STRATEGIES) and seen == reports
    for r in reports:
        assert r.problems == 12 and 0 <= r.correct <= 12 and r.ci_low <= r.accuracy <= r.ci_high
        assert 0 < r.mean_tokens <= budget and r.wall_seconds > 0
    greedy = reports[0]
    assert greedy.correct >= 1, "the bundled model is trained: greedy decoding solves some problems"
    assert greedy.mean_tokens <= arith_config.search.max_path_tokens
    assert "mcts-mini32" in format_table(reports)
    assert all(r.line_auroc is None or 0 <= r.line_auroc <= 1 for r in reports)
    assert all(r.reflection == "off" and r.reflections == 0 == r.reflected_answers for r in reports)


def test_eval_counts_forced_reflections(arith_worker, arith_config):
    """With ``reflection: always`` the trees hold forced reflections, and the rows say so."""
    from dataset.problems import Problem
    from deploy.evaluate import run_eval
    from modelkit.arithmetic import HELD_OUT_SEED_START, make_problems

    config = arith_config.model_copy(update={"search": arith_config.search.model_copy(update={"reflection": "always"})})
    problems = [Problem(p.id, p.question, p.answer) for p in make_problems(6, HELD_OUT_SEED_START + 17)]
    (report,) = run_eval(config, problems, ["mcts-step"], budgets=[config.search.max_path_tokens], concurrency=6)
    assert report.reflection == "always" and report.reflections > 0 and 0 <= report.reflected_answers <= 1


def test_eval_searches_with_the_bundled_value_model(arith_worker, arith_config):
    """best_of_n-prm and mcts-prm on the bundled policy and value model: a ValueWorker is started for the run."""
    from dataset.problems import Problem
    from deploy.evaluate import run_eval
    from modelkit.arithmetic import HELD_OUT_SEED_START, make_problems

    config = arith_config.model_copy(update={"value_model": bundled_value_engine("forest-value")})
    problems = [Problem(p.id, p.question, p.answer) for p in make_problems(8, HELD_OUT_SEED_START + 13)]
    budget = config.search.max_path_tokens
    reports = run_eval(config, problems, ["best_of_n-prm", "mcts-prm"], budgets=[budget], concurrency=8)
    for r in reports:
        assert r.problems == 8 and 0 < r.mean_tokens <= budget and 0 <= r.correct <= 8
    assert reports[1].rule_accuracy is not None  # an MCTS preset: the final rules are compared


def test_a_build_with_the_step_check_answers_only_through_steps_that_hold(arith_worker, arith_config, tmp_path):
    """The bundled model often writes a false sum; with ``step_check: arithmetic`` every answer a tree gives comes
    from a line whose equations hold, while the trees keep the steps that failed (ended there)."""
    import pyarrow.parquet as pq

    from deploy.build import run_build
    from modelkit.arithmetic import make_problems
    from search.checks import false_equation
    from search.params import StepCheck

    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(p.row()) + "\n" for p in make_problems(8, 43)))
    search = arith_config.search.model_copy(update={"step_check": StepCheck.ARITHMETIC, "retry_temperature": 1.0,
                                                    "budget_tokens": 512})
    build = arith_config.build.model_copy(update={"input": str(problems), "output": str(tmp_path / "out"),
                                                  "strategy": "mcts-step"})
    assert run_build(arith_config.model_copy(update={"search": search, "build": build})).built == 8
    trees = pq.read_table(tmp_path / "out" / "trees").to_pylist()
    nodes = pq.read_table(tmp_path / "out" / "nodes",
                          columns=["tree_id", "node_id", "parent_id", "text", "is_terminal"]).to_pylist()
    by_id = {(n["tree_id"], n["node_id"]): n for n in nodes}
    parents = {(n["tree_id"], n["parent_id"]) for n in nodes}

    def line(node) -> str:
        parts = []
        while node is not None:
            parts.append(node["text"] or "")
            node = by_id.get((node["tree_id"], node["parent_id"]))
        return "".join(reversed(parts))

    verified = {n["tree_id"] for n in nodes if n["is_terminal"] and (n["tree_id"], n["node_id"]) not in parents
                and "</Output>" in line(n) and false_equation(line(n)) is None}
    assert verified, "some tree holds a finished line whose equations hold"
    for tree in trees:  # a tree with such a line answers through one (the others fall back to their best line)
        if tree["tree_id"] in verified:
            assert tree["final_answer"] is not None and false_equation(tree["response"]) is None, tree["response"]
    assert any(false_equation(line(n) + "\n") for n in nodes), "the model erred somewhere: the check had work"


@pytest.mark.parametrize("strategy", ["mcts-step", "best_of_n"])
def test_a_build_that_stops_when_right_ends_each_tree_at_a_right_line(strategy, arith_worker, arith_config,
                                                                       tmp_path):
    """``stop_when_right``: a tree whose search finds a line answering the reference (and passing the check) ends
    there and answers with it; a tree that finds none spends its budget as before."""
    from deploy.build import run_build
    from modelkit.arithmetic import make_problems
    from search.checks import false_equation
    from search.params import StepCheck

    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(p.row()) + "\n" for p in make_problems(8, 43)))
    budget = 2 * arith_config.search.max_path_tokens  # room for a line after one that failed
    search = arith_config.search.model_copy(update={"step_check": StepCheck.ARITHMETIC, "retry_temperature": 1.0,
                                                    "budget_tokens": budget, "stop_when_right": True})
    build = arith_config.build.model_copy(update={"input": str(problems), "output": str(tmp_path / "out"),
                                                  "strategy": strategy})
    assert run_build(arith_config.model_copy(update={"search": search, "build": build})).built == 8
    trees = pq.read_table(tmp_path / "out" / "trees").to_pylist()
    right = [t for t in trees if t["stop_reason"] == "right"]
    assert right, "the model answers some of these problems"
    for tree in trees:
        assert tree["tokens_generated"] <= budget
        if tree["stop_reason"] == "right":
            assert tree["correct"] and false_equation(tree["response"]) is None, tree["response"]
    assert sum(t["tokens_generated"] for t in right) / len(right) < budget


def test_model_report_decodes_greedily_and_samples_on_the_worker(arith_worker, arith_config):
    from deploy.model_report import format_report, run_model_report
    from modelkit.arithmetic import HELD_OUT_SEED_START, make_problems

    problems = make_problems(8, HELD_OUT_SEED_START + 11)
    report = run_model_report(arith_config, problems, samples=3)
    assert report.overall.problems == 8 and report.samples == 3
    assert sum(r.problems for r in report.by_length) == 8
    assert {r.changes for r in report.by_length} == {p.changes for p in problems}
    assert report.overall.greedy > 0, "the bundled model is trained: greedy decoding solves some problems"
    assert report.overall.one_sample <= report.overall.pass_at_k
    assert 0 < report.mean_greedy_tokens <= arith_config.search.max_path_tokens
    kinds = {r.kind: r for r in report.by_step_kind}
    assert kinds["start"].greedy_reached == 8 and kinds["start"].sampled_reached == 24
    assert "the first wrong step, by kind" in format_report(report)
    assert "pass@3" in format_report(report)


def test_per_token_design_generates_what_one_call_does(arith_worker):
    """The one-call-per-token engine of `forest bench designs` is the same model, driven slowly."""
    import ray

    from actors.pool import RemoteEngine
    from actors.tokenizer import HFTokenizer
    from bench.engines import PerTokenEngine
    from search.prompts import OUTPUT_END, build_prompt
    from search.protocol import GenerationRequest

    tokenizer = HFTokenizer(BUNDLED_MODEL)
    prompt = np.asarray(tokenizer.encode(build_prompt("Ann has 12 eggs. Then Ann finds 3 more. How many eggs does "
                                                      "Ann have now?")), dtype=np.int32)
    request = GenerationRequest(prompt, max_tokens=40, temperature=0.0, stop=(OUTPUT_END, "\n\n"))
    engine = RemoteEngine(arith_worker)
    (whole,) = asyncio.run(engine.generate(request))
    per_token = PerTokenEngine(engine, tokenizer)
    (stepped,) = asyncio.run(per_token.generate(request))
    assert stepped.token_ids.tolist() == whole.token_ids.tolist()
    assert per_token.calls == len(whole)
    np.testing.assert_allclose(stepped.logprobs, whole.logprobs, atol=1e-3)
    replayed = ray.get(arith_worker.replay.remote([request] * 4, 4))
    assert replayed["generated_tokens"] == 4 * len(whole) and replayed["seconds"] > 0


def test_openai_stop_and_logprobs_on_the_bundled_model(arith_worker, arith_config):
    """Over HTTP with the openai client, on the trained model (whose lines end with answers): ``stop`` cuts the
    answer text, ``logprobs`` returns the answer's tokens with the engine's logprobs (greedy: each token its own
    top-1), ``n`` returns distinct lines."""
    from openai import OpenAI

    with served(arith_config, "arith") as base:
        client = OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)
        messages = [{"role": "user", "content": [{"type": "text", "text": "Ann has 12 eggs. Then Ann finds 3 more."},
                                                 {"type": "text", "text": "How many eggs does Ann have now?"}]}]
        plain = client.chat.completions.create(model="forest-greedy", messages=messages)
        answer = plain.choices[0].message.content
        assert answer and plain.choices[0].finish_reason == "stop" and plain.choices[0].logprobs is None
        cut = client.chat.completions.create(model="forest-greedy", messages=messages, stop=[answer[-1]])
        assert cut.choices[0].message.content == answer[:answer.index(answer[-1])]
        assert cut.choices[0].finish_reason == "stop"

        scored = client.chat.completions.create(model="forest-greedy", messages=messages, logprobs=True,
                                                top_logprobs=2)
        logprobs = scored.choices[0].logprobs
        assert "".join(t.token for t in logprobs.content) == answer
        reasoning = logprobs.model_extra["reasoning_content"]
        assert reasoning and reasoning[0]["token"].startswith("<")
        for token in [*logprobs.content]:
            assert token.logprob <= 0 and len(token.top_logprobs) == 2
            assert token.top_logprobs[0].token == token.token
            assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-4)

        several = client.chat.completions.create(model="forest-best_of_n", messages=messages, n=3, temperature=1.0,
                                                 extra_body={"budget_tokens": 1024})
        texts = [c.message.model_extra["reasoning_content"] + c.message.content for c in several.choices]
        assert len(several.choices) == 3 and len(set(texts)) == 3


def test_serve_answers_with_the_bundled_verifier_gating_the_search(arith_worker, arith_config):
    """The README's best preset online: with the bundled verifier as the value model and ``min_step_score``, the
    endpoint lists and runs ``forest-mcts-prm`` over HTTP (a ValueWorker started by the Serve app)."""
    import httpx

    search = arith_config.search.model_copy(update={"min_step_score": 0.5, "retry_temperature": 1.0})
    config = arith_config.model_copy(update={"value_model": bundled_value_engine("forest-verifier"), "search": search})
    with served(config, "verifier") as base:
        models = {m["id"] for m in httpx.get(f"{base}/models", timeout=60).json()["data"]}
        assert {"forest-mcts-prm", "forest-best_of_n-prm"} <= models
        body = {"model": "forest-mcts-prm", "budget_tokens": 512,
                "messages": [{"role": "user", "content": "Ann has 12 eggs. Then Ann finds 3 more. "
                                                         "How many eggs does Ann have now?"}]}
        response = httpx.post(f"{base}/chat/completions", json=body, timeout=600)
        assert response.status_code == 200, response.text
        data = response.json()
        assert data["choices"][0]["message"]["content"]
        assert 0 < data["usage"]["completion_tokens"] <= 512
        summary = data["forest"]
        assert summary["iterations"] >= 1 and 0 <= summary["value"] <= 1 and summary["failed_checks"] >= 0


@contextlib.contextmanager
def served(config, name: str):
    """The Forest Serve app for ``config`` on a free local port, for the block: yields its ``/v1`` base URL."""
    from ray import serve

    from deploy.serve import app_for

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_for(config), name=name, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        serve.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server():
    """moto's S3-compatible server on a free port; yields a URI prefix with credentials and endpoint."""
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, "moto_server did not start"
            time.sleep(0.2)
    query = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    filesystem, _ = pafs.FileSystem.from_uri(f"s3://testing:testing@forest/x?{query}&allow_bucket_creation=true")
    filesystem.create_dir("forest")  # the bucket
    yield lambda path: f"s3://testing:testing@forest/{path}?{query}", filesystem
    server.terminate()
    server.wait(timeout=30)


def test_a_build_reads_and_writes_object_storage_and_resumes(arith_worker, arith_config, s3_server, tmp_path):
    from modelkit.arithmetic import make_problems
    from deploy.build import run_build

    uri, filesystem = s3_server
    rows = [p.row() for p in make_problems(6, 31)] + [{"id": "bad"}]
    with filesystem.open_output_stream("forest/problems.jsonl") as f:
        f.write("\n".join(json.dumps(r) for r in rows).encode() + b"\n")
    config = arith_config.model_copy(update={"build": arith_config.build.model_copy(update={
        "input": uri("problems.jsonl"), "output": uri("trees-out")})})
    first = run_build(config)
    assert (first.built, first.input_errors) == (6, 1)
    trees = pq.read_table("forest/trees-out/trees", filesystem=filesystem)
    assert sorted(trees.column("problem_id").to_pylist()) == sorted(r["id"] for r in rows[:6])
    nodes = pq.read_table("forest/trees-out/nodes", filesystem=filesystem)
    assert nodes.num_rows == sum(trees.column("num_nodes").to_pylist())
    errors = pq.read_table("forest/trees-out/errors", filesystem=filesystem).to_pylist()
    assert any(e["problem_id"] == "bad" and "question" in e["message"] for e in errors)
    names = {info.base_name for info in filesystem.get_file_info(pafs.FileSelector("forest/trees-out"))}
    assert {"manifest.json", "sft.jsonl", "pairs.parquet", "trees", "nodes"} <= names
    view_index_of_a_real_build(uri("trees-out"), trees, tmp_path)
    again = run_build(config)  # resume: nothing left, nothing duplicated
    assert (again.skipped, again.built) == (6, 0)
    assert pq.read_table("forest/trees-out/trees", filesystem=filesystem).num_rows == 6


def view_index_of_a_real_build(output: str, trees, tmp_path) -> None:
    """`forest view OUT` on the bundled model's build: every tree listed, the wrong-answer filter shows exactly the
    wrong ones, and a tree page draws all its nodes."""
    import re

    from deploy.cli import main as forest
    from tests.integration.conftest import run_chromium

    assert forest(["view", output, "--html", str(tmp_path / "view")]) == 0
    index = tmp_path / "view" / "index.html"
    rows = trees.to_pylist()
    dom, console, _ = run_chromium(index.as_uri(), tmp_path)
    assert f'data-rows="{len(rows)}"' in dom and all(f'data-tree="{r["tree_id"]}"' in dom for r in rows)
    assert not [line for line in console if "Uncaught" in line or "Error" in line], console
    wrong = {r["tree_id"] for r in rows if r["final_answer"] is not None and r["correct"] is False}
    dom, _, _ = run_chromium(f"{index.as_uri()}#filter=wrong", tmp_path)
    shown = set(re.findall(r'<tr data-tree="([^"]+)" data-outcome="[a-z]+">', dom))
    assert shown == wrong
    first = rows[0]
    page, _, _ = run_chromium((index.parent / f"tree-{first['tree_id']}.html").as_uri(), tmp_path)
    assert f'data-drawn-nodes="{first["num_nodes"]}"' in page and "colour" in page


def test_a_policy_written_by_train_policy_loads_in_a_generator_worker(ray_cluster, tmp_path):
    """`forest train-policy` on an sft.jsonl of worked solutions (training seeds), then the fine-tuned model in a
    GeneratorWorker on vLLM: it loads and still answers in Marco-o1's format."""
    import ray

    from actors.pool import RemoteEngine, start_generator_workers
    from actors.tokenizer import HFTokenizer
    from cluster.config import EngineConfig
    from deploy.cli import main as forest
    from modelkit.arithmetic import make_problems
    from search.prompts import OUTPUT_END, build_prompt, extract_answer
    from search.protocol import GenerationRequest

    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"instruction": p.question, "response": p.solution}) + "\n"
                           for p in make_problems(32, 41)))
    tuned = tmp_path / "tuned"
    assert forest(["train-policy", "--sft", str(sft), "--base", BUNDLED_MODEL, "--output", str(tuned),
                   "--epochs", "1", "--threads", "2"]) == 0
    report = json.loads((tuned / "policy_training.json").read_text())
    assert report["train_lines"] + report["dev_lines"] == 32
    (worker,) = start_generator_workers(EngineConfig(model=str(tuned), device="cpu", dtype="float32",
                                                     max_model_len=1024, enforce_eager=True, cpu_kvcache_gib=1),
                                        1, name_prefix="tuned-policy-test")
    try:
        ray_cluster.get(worker.check_health.remote(), timeout=600)
        tokenizer = HFTokenizer(str(tuned))
        question = make_problems(1, 43)[0].question
        prompt = np.asarray(tokenizer.encode(build_prompt(question)), dtype=np.int32)
        (chunk,) = asyncio.run(RemoteEngine(worker).generate(
            GenerationRequest(prompt, max_tokens=400, temperature=0.0, stop=(OUTPUT_END,))))
        assert extract_answer(tokenizer.decode(chunk.token_ids.tolist())) is not None
    finally:
        ray.kill(worker)
