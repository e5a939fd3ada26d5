"""`forest serve` as a user runs it: starts, answers over HTTP, and shuts down cleanly on Ctrl-C and on SIGTERM
(how Kubernetes, Docker and systemd stop a process), also when started with SIGINT ignored (a background job)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
PORT = 8472


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what `cmd &` in a non-interactive shell does


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_forest_serve_runs_until_stopped(tmp_path, tiny_model, ray_address, stop):
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "deploy.cli", "serve", "--config", str(REPO / "deploy/configs/serve.cpu.yaml"),
               "--model", tiny_model, "--workers", "1", "--port", str(PORT)]
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                               preexec_fn=_ignore_sigint)
    try:
        deadline = time.monotonic() + 400
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "forest serve never became healthy"
            try:
                if httpx.get(f"http://127.0.0.1:{PORT}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        body = {"model": "forest-mcts-step", "messages": [{"role": "user", "content": "2+2?"}], "iterations": 2}
        assert httpx.post(f"http://127.0.0.1:{PORT}/v1/chat/completions", json=body, timeout=300).status_code == 200
    finally:
        process.send_signal(stop)
        try:
            code = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    try:
        httpx.get(f"http://127.0.0.1:{PORT}/healthz", timeout=5)
        stopped = False
    except httpx.HTTPError:
        stopped = True
    assert stopped, f"the HTTP endpoint is still up after {stop.name}"
