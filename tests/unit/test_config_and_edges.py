"""Configuration at the edge, worker placement options, progress reporting, filesystem URIs (no Ray cluster)."""

import io
import logging

import pytest
from pydantic import ValidationError

from cluster.config import EngineConfig, load_config
from cluster.placement import worker_placement
from deploy.progress import Progress


def test_yaml_config_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("workers: 3\nsearch:\n  granularity: mini_step:32\n  iterations: 9\n")
    config = load_config(path, **{"search.iterations": 4, "engine.model": "/m", "build.limit": None})
    assert config.workers == 3 and config.search.iterations == 4 and config.engine.model == "/m"
    params = config.search.to_params()
    assert str(params.granularity) == "mini_step:32" and params.budget.iterations == 4


@pytest.mark.parametrize("overrides, field", [
    ({"search.children": 0}, "children"),
    ({"search.granularity": "paragraph"}, "granularity"),
    ({"search.budget_tokens": -3}, "budget_tokens"),
    ({"search.reflection": "maybe"}, "reflection"),
    ({"workers": 0}, "workers"),
    ({"engine.device": "tpu"}, "device"),
    ({"search.itterations": 3}, "itterations"),  # a typo is an error, not silently ignored
])
def test_bad_config_values_name_the_field(overrides, field):
    with pytest.raises(ValidationError) as err:
        load_config(None, **overrides)
    assert field in str(err.value)


def test_placement_per_device():
    assert worker_placement(EngineConfig(), device="cpu", index=0) == {"num_cpus": 1.0, "num_gpus": 0}
    assert worker_placement(EngineConfig(), device="cuda", index=0) == {"num_cpus": 1, "num_gpus": 1}
    assert EngineConfig(device="auto").resolved_device(cluster_gpus=0) == "cpu"
    assert EngineConfig(device="auto", tensor_parallel_size=2).resolved_device(cluster_gpus=1) == "cpu"
    assert EngineConfig(device="auto", tensor_parallel_size=2).resolved_device(cluster_gpus=8) == "cuda"


def test_progress_logs_plain_lines_when_not_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="forest.progress")
    progress = Progress(3, label="build", interval_s=0.0, stream=io.StringIO())
    for ok in (True, False, True):
        progress.update(ok=ok, tokens=10)
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("build: 3/3 problems") and "1 failed" in lines[-1] and "tokens/s" in lines[-1]


def test_progress_draws_a_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = Progress(2, label="build", stream=stream)
    progress.update(ok=True, tokens=5)
    progress.close()
    assert "build:" in stream.getvalue() and "1/2" in stream.getvalue()


def test_sink_writes_through_a_filesystem_uri(tmp_path):
    from actors.sink import ParquetSink
    from deploy.dataset import committed_problem_ids, recorded_errors

    uri = (tmp_path / "out").as_uri()  # file:///...: the same code path as s3:// or gs://
    sink = ParquetSink(uri, session="u")
    sink.add_errors([{"run_id": "r", "problem_id": "x", "stage": "input", "message": "m"}])
    sink.flush()
    assert recorded_errors(uri) == {("x", "input", "m")} and committed_problem_ids(uri) == set()
    assert list((tmp_path / "out" / "errors").glob("part-u-*.parquet"))


def test_vllm_flat_logprobs_become_fixed_shape_chunks():
    """vLLM's flat logprobs: per position the sampled token first, then the top-k by rank."""
    from types import SimpleNamespace as Output

    from actors.generator import chunk_from_output
    from search.protocol import FinishReason

    full = Output(start_indices=[0, 6], end_indices=[6, 12], token_ids=[9, 9, 1, 2, 3, 4, 7, 5, 6, 7, 8, 10],
                  logprobs=[-0.1, -0.1, -1, -2, -3, -4, -2, -0.5, -1, -2, -3, -4])
    c = chunk_from_output(Output(logprobs=full, token_ids=[9, 7], finish_reason="stop", stop_reason=None),
                          eos_token_id=7, num_cached_tokens=3)
    assert c.logprobs.tolist() == pytest.approx([-0.1, -2.0])
    assert c.top_ids.tolist() == [[9, 1, 2, 3, 4], [5, 6, 7, 8, 10]]
    assert c.finish_reason is FinishReason.EOS and c.num_cached_tokens == 3
    short = Output(start_indices=[0], end_indices=[3], token_ids=[9, 9, 1], logprobs=[-0.1, -0.1, -1])
    c = chunk_from_output(Output(logprobs=short, token_ids=[9], finish_reason="length", stop_reason=None), 7, 0)
    assert c.top_ids.tolist() == [[9, 1, -1, -1, -1]] and c.top_logprobs[0, 2] == float("-inf")
    assert c.finish_reason is FinishReason.LENGTH
