"""The vLLM adapter's conversions, on vLLM-shaped outputs (no engine)."""

import json
import os
from types import SimpleNamespace as Output

import pytest

from actors.vllm_engine import (
    CPU_EXECUTOR,
    _engine_args,
    chunk_from_output,
    cpu_has_fast_bf16,
    cpuinfo_field,
    resolve_dtype,
    skip_logprob_token_text,
)
from cluster.config import EngineConfig
from search.protocol import EngineError, FinishReason

def test_vllm_flat_logprobs_become_fixed_shape_chunks():
    """vLLM's flat logprobs: per position the sampled token first, then the top-k by rank."""
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


@pytest.mark.parametrize("reason", ["error", None])
def test_an_unknown_finish_reason_fails_the_request(reason):
    """Not silently a STOP: the request fails with the reason named."""
    flat = Output(start_indices=[0], end_indices=[6], token_ids=[9, 9, 1, 2, 3, 4], logprobs=[-0.1] * 6)
    with pytest.raises(EngineError, match=repr(reason)):
        chunk_from_output(Output(logprobs=flat, token_ids=[9], finish_reason=reason, stop_reason=None), 7, 0)


@pytest.mark.parametrize(("configured", "declared", "device", "fast_bf16", "resolved"), [
    ("auto", "float32", "cpu", False, "float32"),  # vLLM's CPU auto would run bfloat16 at half the rate
    ("auto", "float32", "cpu", True, "bfloat16"),  # a CPU with bfloat16 units
    ("auto", "bfloat16", "cpu", False, "bfloat16"),
    ("auto", "bfloat16", "cuda", False, "bfloat16"),  # GPUs: the model's own dtype
    ("auto", "float16", "cuda", False, "float16"),
    ("auto", None, "cpu", False, "auto"),  # nothing declared: vLLM decides
    ("float16", "float32", "cpu", False, "float16"),  # an explicit dtype is kept
])
def test_auto_dtype_resolves_to_the_fastest_correct_one(tmp_path, configured, declared, device, fast_bf16,
                                                        resolved):
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": declared} if declared else {}))
    assert resolve_dtype(configured, str(tmp_path), device, fast_bf16=fast_bf16) == resolved


def test_cpu_bf16_support_is_read_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert not cpu_has_fast_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_fast_bf16(str(info))
    assert not cpu_has_fast_bf16(str(tmp_path / "missing"))


def test_cpuinfo_fields_are_read_by_name(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu\n\nprocessor\t: 1\n"
                    "model name\t: Other\n")
    assert cpuinfo_field("model name", str(info)) == "Some CPU @ 2.0GHz"  # the first CPU's
    assert cpuinfo_field("flags", str(info)) == "fpu"
    assert cpuinfo_field("bogomips", str(info)) is None and cpuinfo_field("flags", str(tmp_path / "no")) is None


def test_logprobs_are_returned_without_their_token_texts():
    """vLLM's logprobs processor gets no tokenizer, so it decodes no token texts (Forest reads ids and logprobs);
    the hook is installed once however often engines start."""
    from vllm.v1.engine.logprobs import LogprobsProcessor

    assert skip_logprob_token_text()
    hook = LogprobsProcessor.__dict__["from_new_request"].__func__
    assert skip_logprob_token_text() and LogprobsProcessor.__dict__["from_new_request"].__func__ is hook
    request = Output(sampling_params=Output(num_logprobs=5, prompt_logprobs=None, flat_logprobs=True))
    processor = LogprobsProcessor.from_new_request(tokenizer=object(), request=request)
    assert processor.tokenizer is None and processor.num_logprobs == 5 and processor.logprobs is not None


@pytest.mark.parametrize(("device", "tensor_parallel_size", "backend"), [
    ("cpu", 1, CPU_EXECUTOR),  # the model in the engine-core process: no third process waiting in a spin loop
    ("cuda", 1, None),  # vLLM's default
    ("cuda", 2, "ray"),  # shards in the worker's placement group
])
def test_the_executor_suits_the_device(monkeypatch, device, tensor_parallel_size, backend):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    for name in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"):
        monkeypatch.delenv(name, raising=False)
    args = _engine_args(EngineConfig(tensor_parallel_size=tensor_parallel_size), seed=0, device=device)
    assert args.distributed_executor_backend == backend
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == ("0" if backend == CPU_EXECUTOR else "1")


def test_a_worker_exits_once_its_engine_reports_itself_dead(monkeypatch):
    """The watch needs no request to notice: it exits (for Ray's restart) when the engine says it errored."""
    import asyncio

    from actors import generator

    exits = []
    monkeypatch.setattr(generator, "WATCH_SECONDS", 0.01)
    monkeypatch.setattr(generator, "exit_for_restart", exits.append)
    engine = Output(errored=False)

    async def scenario():
        watch = generator.watch_engine(engine, "engine")
        await asyncio.sleep(0.05)
        assert not exits and not watch.done()
        engine.errored = True
        await asyncio.wait_for(watch, timeout=1.0)

    asyncio.run(scenario())
    assert exits == ["engine"]
