"""Dataset builds end to end: real Ray, real vLLM CPU engines, Parquet read back by pyarrow, pandas, Ray Data."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cluster.cpus import allowed_cores
from search.confidence import token_confidence
from tests.integration.conftest import write_build_config

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")  # the venv's CLI; make does not activate the venv


def problems_file(path: Path, good: int) -> tuple[str, list[str]]:
    rows = [json.dumps({"id": f"p{i:03d}", "question": f"Ann has {i} apples and buys 3 more. How many?",
                        "answer": str(i + 3)}) for i in range(good)]
    rows += [
        json.dumps({"id": "no-question"}),
        json.dumps({"id": "empty", "question": ""}),
        json.dumps({"id": "number", "question": 12}),
        json.dumps({"id": "p000", "question": "duplicate id"}),
        "this line is not JSON",
        json.dumps({"id": "too-long", "question": "apples " * 3000}),
    ]
    path.write_text("\n".join(rows) + "\n")
    return str(path), [f"p{i:03d}" for i in range(good)]


def committed_parts(out: Path) -> int:
    return len(list((out / "trees").glob("part-*.parquet"))) if (out / "trees").exists() else 0


def check_output(out: Path, good_ids: list[str], workers: int = 1) -> None:
    """Every good problem exactly once, bad rows recorded, nodes consistent with trees, files readable."""
    for f in out.rglob("*.parquet"):
        pq.read_table(f)  # every file is complete
    assert not list(out.rglob("_tmp-*"))
    trees = pq.read_table(out / "trees").to_pandas()
    assert sorted(trees.problem_id) == sorted(good_ids)
    nodes = pq.read_table(out / "nodes").to_pandas()
    assert set(nodes.tree_id) == set(trees.tree_id)
    assert (nodes.groupby("tree_id").size().sort_index() == trees.set_index("tree_id").num_nodes.sort_index()).all()
    errors = pq.read_table(out / "errors").to_pandas()
    by_id = errors.groupby("problem_id").message.apply(list).to_dict()
    assert "missing field 'question'" in by_id["no-question"][0]
    assert "is empty" in by_id["empty"][0]
    assert "must be a string" in by_id["number"][0]
    assert "duplicate id 'p000'" in by_id["p000"][0]
    assert any("not valid JSON" in m[0] for k, m in by_id.items() if k.startswith("row-"))
    assert "max_model_len" in by_id["too-long"][0]
    assert not errors.duplicated(["problem_id", "stage", "message"]).any()
    generated = nodes[nodes.kind.isin(["chunk", "rollout"])].head(40)
    for row in generated.itertuples():
        c = token_confidence(np.array(row.token_ids), np.array(row.logprobs), np.stack(row.top_ids),
                             np.stack(row.top_logprobs))
        assert row.confidence == pytest.approx(c.mean(), rel=1e-4)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["trees"] == len(good_ids) and manifest["config_hash"]
    engines = [session["engine"] for session in manifest["sessions"] if session["engine"]]
    assert engines, "a session that started workers records the engine settings vLLM ran with"
    assert all(e["dtype"] == "float32" and e["vllm_version"] and e["block_size"] > 0 for e in engines)
    assert all(e["executor"] == "uni" for e in engines), "CPU engines run the model in the engine-core process"
    cores = allowed_cores()  # the first engine computes on the last core when the engines leave a core to the rest
    assert all(e["cpu_core"] == (cores[-1] if len(cores) > workers else None) for e in engines)
    managers = [m for session in manifest["sessions"] if session["built"] for m in session["managers"]]
    assert any(m["cpu_seconds"] > 0 and m["requests"] > 0 for m in managers), "managers record their CPU time"
    pq.read_table(out / "pairs.parquet")
    for line in (out / "sft.jsonl").read_text().splitlines():
        assert set(json.loads(line)) == {"instruction", "response"}


def free_ports(count: int) -> list[int]:
    import socket
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def build_command(config: str, inp: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "deploy.build", "--config", config, "--input", inp, "--output", str(out)]


def test_driver_sigkill_then_resume_builds_everything_exactly_once(tmp_path, tiny_model, ray_address):
    inp, good = problems_file(tmp_path / "problems.jsonl", 24)
    config = write_build_config(tmp_path / "build.yaml", tiny_model, workers=1)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(build_command(config, inp, out), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while committed_parts(out) < 1 and first.poll() is None:
        assert time.monotonic() < deadline, "the first run committed nothing"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    partial = pq.read_table(out / "trees").num_rows
    assert 0 < partial < len(good), "the kill must land mid-build"
    second = subprocess.run(build_command(config, inp, out), cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"already built {partial}" in second.stdout
    # engine start-up is its own phase: logged before and after, and before the first throughput line
    starting, ready = second.stderr.find("starting 1 engine(s)"), second.stderr.find("1 engine(s) ready in")
    assert 0 <= starting < ready < second.stderr.find("forest.progress"), second.stderr[-3000:]
    check_output(out, good)
    # the outputs read back with pandas and Ray Data
    assert len(pd.read_parquet(out / "nodes")) == pq.read_table(out / "nodes").num_rows
    import ray
    assert ray.data.read_parquet(str(out / "trees")).count() == len(good)
    # a third run has nothing left to do and duplicates nothing
    third = subprocess.run(build_command(config, inp, out), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert third.returncode == 0 and f"already built {len(good)}" in third.stdout
    check_output(out, good)


def test_killing_a_worker_and_a_manager_mid_build_loses_nothing(tmp_path, tiny_model, ray_cluster):
    """Three managers share the build on a cluster that declares GPUs (workers on the CPU build); a worker and a
    manager are killed mid-build: the worker's requests and the manager's unfinished trees are redone elsewhere."""
    from cluster.config import load_config
    from deploy.build import run_build

    inp, good = problems_file(tmp_path / "problems.jsonl", 30)
    out = tmp_path / "out"
    config = load_config(write_build_config(tmp_path / "build.yaml", tiny_model, workers=2, managers=3),
                         **{"build.input": inp, "build.output": str(out), "search.iterations": 10})
    summary = {}
    thread = threading.Thread(target=lambda: summary.update(result=run_build(config)))
    thread.start()
    deadline = time.monotonic() + 300
    while committed_parts(out) < 1:
        assert time.monotonic() < deadline and thread.is_alive(), "the build committed nothing"
        time.sleep(0.1)
    names = [a["name"] for a in ray_cluster.util.list_named_actors(all_namespaces=True)]
    worker = ray_cluster.get_actor(sorted(n for n in names if "-worker-" in n)[0])
    ray_cluster.kill(worker, no_restart=False)
    manager = ray_cluster.get_actor(sorted(n for n in names if "-manager-" in n)[0])
    ray_cluster.kill(manager, no_restart=True)
    thread.join(timeout=900)
    assert not thread.is_alive()
    result = summary["result"]
    assert result.built == len(good) and result.failed == 1  # the over-long prompt
    assert result.worker_failures >= 1
    check_output(out, good, workers=2)


def test_ray_job_submit_runs_a_build(tmp_path, tiny_model):
    inp, good = problems_file(tmp_path / "problems.jsonl", 4)
    config = write_build_config(tmp_path / "build.yaml", tiny_model, workers=1)
    out = tmp_path / "job-out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    env["PATH"] = f"{Path(RAY).parent}:{env.get('PATH', '')}"  # the job's `python` is this venv's, as for a user
    # this session's cluster already holds Ray's default agent ports: give the second cluster its own
    port, dash, agent, grpc, metrics, runtime_env = free_ports(6)
    temp_dir = tempfile.mkdtemp(prefix="forest-job-", dir="/tmp")  # short: Ray's socket paths must stay short
    start = [RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
             f"--temp-dir={temp_dir}",
             f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}"]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
    submit = [RAY, "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", str(REPO), "--",
              "python", "-m", "deploy.build", "--config", config, "--input", inp, "--output", str(out)]
    try:
        for _ in range(30):  # the dashboard's job agent comes up a little after `ray start` returns
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in job.stderr:
                break
            time.sleep(2)
    finally:  # `ray stop` would stop every cluster on the machine, this session's too: stop only this one
        subprocess.run(["pkill", "-9", "-f", temp_dir], capture_output=True, timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "build finished" in job.stdout and "built 4" in job.stdout
    check_output(out, good)
