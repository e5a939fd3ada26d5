"""One local Ray cluster and as few real vLLM (CPU build) engines as possible for the whole session.

Engines take tens of seconds to start here, so the two GeneratorWorkers are started once and shared.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
METRICS_PORT = 18431  # this session's Prometheus export port


def run_chromium(url: str, tmp_path) -> tuple[str, list[str], "os.PathLike"]:
    """Load ``url`` in headless Chromium: (DOM after scripts ran, console lines, screenshot path)."""
    import subprocess

    flags = ["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--window-size=1400,900"]
    shot = tmp_path / "page.png"
    grab = subprocess.run([*flags, f"--user-data-dir={tmp_path / 'profile-a'}", "--enable-logging=stderr", "--v=0",
                           f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    console = [line for line in grab.stderr.splitlines() if ":CONSOLE" in line]
    dom = subprocess.run([*flags, f"--user-data-dir={tmp_path / 'profile-b'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    return dom, console, shot


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from modelkit.make_model import make_tiny_random

    return str(make_tiny_random(tmp_path_factory.mktemp("model") / "tiny-random", seed=0))


@pytest.fixture(scope="session")
def ray_cluster():
    """Declares 4 GPUs (there are none) so that placement is tested as on a GPU node; engines use the CPU build."""
    import ray

    ray.init(address="local", num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=METRICS_PORT)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def engine_config(tiny_model):
    from cluster.config import EngineConfig

    # float32 so the transformers oracle matches; eager mode starts faster on the CPU build
    return EngineConfig(model=tiny_model, device="cpu", dtype="float32", max_model_len=1024, enforce_eager=True,
                        cpu_kvcache_gib=1, max_num_seqs=64, seed=100)


@pytest.fixture(scope="module")
def workers(ray_cluster, engine_config):
    """Two GeneratorWorkers (seeds 100 and 101), ready; stopped after the module to free the CPUs."""
    from actors.pool import start_generator_workers

    handles = start_generator_workers(engine_config, 2)
    ray_cluster.get([w.check_health.remote() for w in handles], timeout=600)
    yield handles
    for w in handles:
        ray_cluster.kill(w)


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from actors.tokenizer import HFTokenizer

    return HFTokenizer(tiny_model)


@pytest.fixture(scope="session")
def ray_address(ray_cluster) -> str:
    """For subprocesses (a build driver) that attach to this session's cluster."""
    return ray_cluster.get_runtime_context().gcs_address


def write_build_config(path, model: str, **build) -> str:
    """A small, fast build config for tests (CPU build, tiny model)."""
    import yaml

    config = {
        "workers": build.pop("workers", 1),
        "engine": {"model": model, "device": "cpu", "dtype": "float32", "max_model_len": 1024,
                   "enforce_eager": True, "cpu_kvcache_gib": 1, "max_num_seqs": 64},
        "search": {"granularity": "step", "max_step_tokens": 24, "children": 2, "iterations": 6,
                   "max_path_tokens": 96, "parallel": 4},
        "build": {"flush_trees": 2, "flush_seconds": 1.0, "max_active_trees": 8, **build},
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)
