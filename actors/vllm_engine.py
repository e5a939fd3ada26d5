"""The vLLM adapter: one vLLM ``AsyncLLM`` (GPU build or CPU build) behind the search core's ``Engine`` protocol,
and one on vLLM's pooling runner behind its ``Scorer`` protocol (``VLLMScorer``, a value model).

``VLLMEngine`` is a plain class (constructible and testable without Ray); ``actors.generator.GeneratorWorker`` is
the thin Ray actor around it. Many requests are in flight at once (vLLM batches them); cancelling a caller's
``generate`` aborts the request in the engine. Bad requests fail alone with ``EngineError``; a dead engine
raises ``EngineDeadError`` so the caller can re-send the work to another worker.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass

import numpy as np
import psutil

from actors.value_input import LikelihoodInput
from cluster.config import EngineConfig
from search.confidence import with_confidences
from search.protocol import TOP_K, Chunk, EngineDeadError, EngineError, FinishReason, GenerationRequest, ScoreRequest

CPU_EXECUTOR = "uni"  # a CPU engine runs its model in the engine-core process (see _engine_args)
CPU_MIN_BATCHED_TOKENS = 8192  # tokens one CPU engine step may take (whole prefills need at least max_model_len)
FAST_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo flags of CPUs with bfloat16 units

log = logging.getLogger(__name__)

_FINISH = {"length": FinishReason.LENGTH, "stop": FinishReason.STOP, "abort": FinishReason.ABORTED}
"""vLLM's finish reasons; any other (``error``, or none for an unfinished output) fails the request."""


@dataclass(frozen=True, slots=True)
class WorkerStats:
    seed: int
    requests_in_flight: int
    requests_done: int
    requests_failed: int
    prompt_tokens: int
    cached_prompt_tokens: int
    generated_tokens: int
    busy_seconds: float  # wall time with at least one request in flight
    pid: int  # the worker's process
    engine_pids: tuple[int, ...]  # its child processes (vLLM's engine core), for operators and fault injection


def process_ids() -> tuple[int, tuple[int, ...]]:
    """This process's id and its children's (vLLM's engine core), for operators and fault injection."""
    process = psutil.Process()
    return process.pid, tuple(p.pid for p in process.children(recursive=True))


def _model_config(model: str) -> dict:
    """A local model directory's ``config.json``; empty when there is none to read (e.g. a hub name)."""
    try:
        with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def model_dtype(model: str) -> str | None:
    """The dtype a model's ``config.json`` declares (``torch_dtype``, or ``dtype`` in newer files), if any."""
    declared = _model_config(model)
    dtype = declared.get("torch_dtype") or declared.get("dtype")
    return str(dtype).removeprefix("torch.") if dtype else None


def is_causal_lm(model: str) -> bool:
    """Whether a local model directory holds a causal LM (``*ForCausalLM``), which a value model can only be as a
    verifier read by likelihood; False when it cannot be told."""
    return any(str(a).endswith("ForCausalLM") for a in _model_config(model).get("architectures") or ())


def cpuinfo_field(key: str, cpuinfo_path: str = "/proc/cpuinfo") -> str | None:
    """The value of the first ``key`` line of ``/proc/cpuinfo`` (e.g. ``flags``, ``model name``); None when there is
    none or the file cannot be read (not Linux)."""
    try:
        with open(cpuinfo_path, encoding="utf-8") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_has_fast_bf16(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX); False when it cannot be told."""
    flags = cpuinfo_field("flags", cpuinfo_path)
    return flags is not None and not FAST_BF16_CPU_FLAGS.isdisjoint(flags.split())


def resolve_dtype(dtype: str, model: str, device: str, *, fast_bf16: bool | None = None) -> str:
    """The dtype an engine runs: ``dtype`` unless it is ``auto``; then the fastest correct one for the device.

    vLLM's CPU build runs ``auto`` float32 models in bfloat16, which a CPU without bfloat16 units computes at about
    half the float32 rate (and less exactly), so there a float32 model runs in float32. On GPUs and other models,
    the model's own dtype. ``auto`` stays only when the model declares none (vLLM then decides).
    """
    if dtype != "auto":
        return dtype
    native = model_dtype(model)
    if native is None:
        return "auto"
    if device == "cpu" and native == "float32":
        return "bfloat16" if (cpu_has_fast_bf16() if fast_bf16 is None else fast_bf16) else "float32"
    return native


def _engine_args(config: EngineConfig, *, seed: int, device: str, pooling: bool = False, prefix_caching: bool = True):
    """vLLM's engine arguments; ``pooling``: the pooling runner (a value model), without sampling settings;
    ``prefix_caching=False`` turns the cache off whatever the config says (a verifier reads its prompts' logprobs,
    which a cached prefix would not compute)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    cpu_only = {}
    backend = None
    if device == "cpu":  # else the CPU build claims most of the RAM for its KV cache
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kvcache_gib)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # several workers may share the cores
        # vLLM 0.32's CPU build kills the engine when a seeded request's prefill is chunked: it rewinds the
        # request's torch.Generator by an offset, which CPU generators do not have. Whole prefills avoid that.
        cpu_only = {"enable_chunked_prefill": False,
                    "max_num_batched_tokens": max(config.max_model_len, CPU_MIN_BATCHED_TOKENS)}
        if config.tensor_parallel_size == 1:
            # The model runs inside vLLM's engine-core process. vLLM's CPU platform turns "uni" into its multiprocess
            # executor unless this is "0"; that one puts the model in a third process, and the engine core waits for
            # each step in a sched_yield loop that takes up to a whole core (of two, on a small machine).
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            backend = CPU_EXECUTOR
    elif config.tensor_parallel_size > 1:  # GPUs: vLLM starts its shard workers in the actor's placement group
        backend = "ray"
    runner = {"runner": "pooling", "enable_prefix_caching": False} if pooling else {
        "max_logprobs": TOP_K, "enable_prefix_caching": config.enable_prefix_caching and prefix_caching}
    return AsyncEngineArgs(
        distributed_executor_backend=backend,
        model=config.model, tokenizer=config.model, dtype=resolve_dtype(config.dtype, config.model, device),
        max_model_len=config.max_model_len,
        tensor_parallel_size=config.tensor_parallel_size, gpu_memory_utilization=config.gpu_memory_utilization,
        enforce_eager=config.enforce_eager, max_num_seqs=config.max_num_seqs, seed=seed, block_size=config.block_size,
        **runner, **cpu_only)


def chunk_from_output(completion, eos_token_id: int, num_cached_tokens: int) -> Chunk:
    """A vLLM ``CompletionOutput`` with flat logprobs -> ``Chunk``.

    With ``flat_logprobs=True`` position i holds the sampled token first, then the top-k by rank.
    """
    flat = completion.logprobs
    count = len(completion.token_ids)
    token_ids = np.asarray(completion.token_ids, dtype=np.int32)
    starts = np.asarray(flat.start_indices[:count], dtype=np.int64)
    ends = np.asarray(flat.end_indices[:count], dtype=np.int64)
    all_ids = np.asarray(flat.token_ids, dtype=np.int32)
    all_lps = np.asarray(flat.logprobs, dtype=np.float32)
    if count and (ends - starts == TOP_K + 1).all():  # the usual case: gather without a Python loop
        columns = starts[:, None] + 1 + np.arange(TOP_K)
        return _chunk(completion, token_ids, all_lps[starts], all_ids[columns], all_lps[columns], eos_token_id,
                      num_cached_tokens)
    logprobs = np.empty(count, dtype=np.float32)
    top_ids = np.full((count, TOP_K), -1, dtype=np.int32)
    top_lps = np.full((count, TOP_K), -np.inf, dtype=np.float32)
    for i in range(count):  # fewer alternatives than TOP_K somewhere (a tiny vocabulary)
        start, end = flat.start_indices[i], flat.end_indices[i]
        logprobs[i] = flat.logprobs[start]
        alternatives = min(end - start - 1, TOP_K)
        top_ids[i, :alternatives] = flat.token_ids[start + 1:start + 1 + alternatives]
        top_lps[i, :alternatives] = flat.logprobs[start + 1:start + 1 + alternatives]
    return _chunk(completion, token_ids, logprobs, top_ids, top_lps, eos_token_id, num_cached_tokens)


def _chunk(completion, token_ids, logprobs, top_ids, top_lps, eos_token_id: int, num_cached_tokens: int) -> Chunk:
    count = len(token_ids)
    finish = _FINISH.get(completion.finish_reason)
    if finish is None:
        raise EngineError(f"vLLM finished a sample with reason {completion.finish_reason!r}; expected one of "
                          f"{', '.join(_FINISH)}")
    if finish is FinishReason.STOP and count and completion.stop_reason is None and token_ids[-1] == eos_token_id:
        finish = FinishReason.EOS
    return with_confidences(Chunk(token_ids, logprobs, top_ids, top_lps, finish, num_cached_tokens))


def skip_logprob_token_text() -> bool:
    """Stop vLLM's front end from decoding each logprob's token id to text; True when it is (now) skipped.

    vLLM turns every returned logprob (the sampled token and the top 5: six per generated token) into text for
    ``Logprob.decoded_token``, checking byte-fallback pieces against their context. Forest reads only the ids and
    logprobs, and that decoding was about a third of a worker process's CPU time (a py-spy profile during
    ``forest bench engine``), taken from the cores the engine runs on. A logprobs processor without a tokenizer
    leaves the text out (``decoded_token`` None), as vLLM does with ``detokenize=False``; the output text, and so
    stop strings, has its own detokenizer and is unaffected. The hook is vLLM's ``LogprobsProcessor``
    constructor; where a vLLM version has no such hook, the text is decoded as before (said in the log).
    """
    try:
        from vllm.v1.engine.logprobs import LogprobsProcessor
    except ImportError as exc:
        log.warning("vLLM decodes logprob token texts (no LogprobsProcessor to skip them: %s)", exc)
        return False
    build = LogprobsProcessor.__dict__.get("from_new_request")
    if getattr(getattr(build, "__func__", None), "forest_skips_text", False):
        return True
    if not isinstance(build, classmethod) or "tokenizer" not in inspect.signature(build.__func__).parameters:
        log.warning("vLLM decodes logprob token texts (LogprobsProcessor.from_new_request takes no tokenizer)")
        return False
    original = build.__func__

    def from_new_request(cls, tokenizer, request):
        return original(cls, tokenizer=None, request=request)

    from_new_request.forest_skips_text = True
    LogprobsProcessor.from_new_request = classmethod(from_new_request)
    return True


class VLLMEngine:
    """One vLLM engine implementing ``search.protocol.Engine`` (the GPU build or the CPU build)."""

    def __init__(self, config: EngineConfig, *, seed: int, device: str = "cpu"):
        from vllm.v1.engine.async_llm import AsyncLLM

        self.config, self.seed, self.device = config, seed, device
        skip_logprob_token_text()
        self.engine = AsyncLLM.from_engine_args(_engine_args(config, seed=seed, device=device))
        self.eos_token_id = self.engine.tokenizer.eos_token_id if hasattr(self.engine, "tokenizer") else None
        if self.eos_token_id is None:
            from transformers import AutoTokenizer
            self.eos_token_id = AutoTokenizer.from_pretrained(config.model).eos_token_id
        self.in_flight = 0
        self.done = self.failed = 0
        self.prompt_tokens = self.cached_prompt_tokens = self.generated_tokens = 0
        self._busy_since: float | None = None
        self._busy_total = 0.0

    def _validate(self, request: GenerationRequest) -> int:
        """Checks a request; returns ``max_tokens`` clipped to the context left after the prompt."""
        prompt_len = len(request.prompt_token_ids)
        problems = []
        if prompt_len == 0:
            problems.append("prompt_token_ids is empty")
        if prompt_len >= self.config.max_model_len:
            problems.append(f"prompt has {prompt_len} tokens; the model allows at most "
                            f"{self.config.max_model_len - 1} before generating")
        if request.max_tokens < 1:
            problems.append(f"max_tokens={request.max_tokens} must be >= 1")
        if request.n < 1:
            problems.append(f"n={request.n} must be >= 1")
        if request.temperature < 0:
            problems.append(f"temperature={request.temperature} must be >= 0")
        if not 0 < request.top_p <= 1:
            problems.append(f"top_p={request.top_p} must lie in (0, 1]")
        if problems:
            raise EngineError("bad request: " + "; ".join(problems))
        return min(request.max_tokens, self.config.max_model_len - prompt_len)

    def _sampling_params(self, request: GenerationRequest, max_tokens: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=request.n, max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
            seed=request.seed, stop=list(request.stop), stop_token_ids=list(request.stop_token_ids),
            logprobs=request.logprobs, flat_logprobs=True, output_kind=RequestOutputKind.FINAL_ONLY)

    async def generate(self, request: GenerationRequest) -> list[Chunk]:
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDead

        max_tokens = self._validate(request)
        params = self._sampling_params(request, max_tokens)
        prompt = TokensPrompt(prompt_token_ids=np.asarray(request.prompt_token_ids).tolist())
        request_id = f"{request.request_id or 'req'}-{uuid.uuid4().hex[:8]}"
        self._enter()
        final = None
        try:
            async for output in self.engine.generate(prompt, params, request_id=request_id):
                final = output
        except VLLMEngineDead as exc:
            self.failed += 1
            raise EngineDeadError(f"vLLM engine (seed {self.seed}) died: {exc}") from exc
        except (ValueError, TypeError) as exc:  # vLLM's validation errors
            self.failed += 1
            raise EngineError(f"bad request: {exc}") from exc
        finally:
            self._leave()
        if final is None:
            raise EngineError(f"request {request_id} returned no output")
        cached = final.num_cached_tokens or 0
        chunks = [chunk_from_output(c, self.eos_token_id, cached) for c in final.outputs]
        self.done += 1
        self.prompt_tokens += len(request.prompt_token_ids)
        self.cached_prompt_tokens += cached
        self.generated_tokens += sum(len(c) for c in chunks)
        return chunks

    def _enter(self) -> None:
        if self.in_flight == 0:
            self._busy_since = time.monotonic()
        self.in_flight += 1

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._busy_since is not None:
            self._busy_total += time.monotonic() - self._busy_since
            self._busy_since = None

    def stats(self) -> WorkerStats:
        busy = self._busy_total + (time.monotonic() - self._busy_since if self._busy_since else 0.0)
        return WorkerStats(self.seed, self.in_flight, self.done, self.failed, self.prompt_tokens,
                           self.cached_prompt_tokens, self.generated_tokens, busy, *process_ids())

    def settings(self) -> dict:
        """The engine settings vLLM actually runs with (the resolved dtype, not ``auto``), for manifests."""
        return engine_settings(self.engine, self.config, self.device)

    async def check_health(self) -> None:
        await _check_health(self.engine, self.seed)

    async def reset_prefix_cache(self) -> None:
        await self.engine.reset_prefix_cache()

    def shutdown(self) -> None:
        self.engine.shutdown()


def engine_settings(engine, config: EngineConfig, device: str) -> dict:
    """What a running ``AsyncLLM`` was built with (the resolved dtype, not ``auto``)."""
    import vllm

    vllm_config = engine.vllm_config
    model = vllm_config.model_config
    return {"model": config.model, "device": device, "configured_dtype": config.dtype,
            "dtype": str(model.dtype).removeprefix("torch."), "enforce_eager": bool(model.enforce_eager),
            "max_model_len": int(model.max_model_len), "block_size": vllm_config.cache_config.block_size,
            "prefix_caching": bool(vllm_config.cache_config.enable_prefix_caching),
            "tensor_parallel_size": vllm_config.parallel_config.tensor_parallel_size,
            "executor": str(vllm_config.parallel_config.distributed_executor_backend),
            "runner": str(model.runner_type), "vllm_version": vllm.__version__}


async def _check_health(engine, seed: int) -> None:
    from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDead
    try:
        await engine.check_health()
    except VLLMEngineDead as exc:
        raise EngineDeadError(f"vLLM engine (seed {seed}) died: {exc}") from exc


def score_rows(ids: np.ndarray, positions: np.ndarray, rows: int, step_tag: int | None) -> np.ndarray:
    """The rows of a ``token_classify`` output that hold the scores at ``positions`` of ``ids``: the positions
    themselves when the model returned a row per token; when it returned rows only at its step tag token (vLLM's
    step pooling, which ``Qwen2ForProcessRewardModel`` uses), each position's rank among the tags, and then every
    position must be a tag (``value_input.step_separator`` puts one after each step)."""
    if rows == len(ids):
        return positions
    tags = ids == step_tag  # all False when the model has no step tag (None)
    if step_tag is None or rows != int(tags.sum()):
        raise EngineError(f"the value model returned {rows} scores for {len(ids)} tokens "
                          f"({int(tags.sum())} step tags, step_tag_id {step_tag})")
    if not tags[positions].all():
        raise EngineError(f"the value model scores only at its step tag (token {step_tag}); positions "
                          f"{positions[~tags[positions]].tolist()} are not one: set value_input.step_separator to it")
    return np.cumsum(tags)[positions] - 1


def _prompt_logprobs(flat, count: int) -> np.ndarray:
    """Per prompt token, the log-probability of that token given the ones before (flat logprobs of a request with
    ``prompt_logprobs=0``: each position starts with the prompt's own token); NaN for the first token."""
    lps = np.full(count, np.nan, dtype=np.float32)
    starts = np.asarray(flat.start_indices[1:count], dtype=np.int64)
    lps[1:] = np.asarray(flat.logprobs, dtype=np.float32)[starts]
    return lps


class _ValueEngine:
    """What the two value-model engines share: their last output, vLLM's errors mapped to Forest's, and the engine's
    settings, health and shutdown."""

    config: EngineConfig
    seed: int
    device: str
    engine: object  # a vLLM AsyncLLM
    kind: str  # how errors name the engine

    async def _final(self, outputs, request_id: str):
        """The last of a request's ``outputs`` (vLLM's async stream); ``EngineDeadError`` or ``EngineError``."""
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDead

        final = None
        try:
            async for output in outputs:
                final = output
        except VLLMEngineDead as exc:
            raise EngineDeadError(f"vLLM {self.kind} engine (seed {self.seed}) died: {exc}") from exc
        except (ValueError, TypeError) as exc:
            raise EngineError(f"bad score request: {exc}") from exc
        if final is None:
            raise EngineError(f"score request {request_id} returned no output")
        return final

    def settings(self) -> dict:
        return engine_settings(self.engine, self.config, self.device)

    async def check_health(self) -> None:
        await _check_health(self.engine, self.seed)

    def shutdown(self) -> None:
        self.engine.shutdown()


class VLLMLikelihood(_ValueEngine):
    """A verifier (a causal LM) on vLLM's generate runner, implementing ``search.protocol.Scorer``: each request is
    rendered by ``LikelihoodInput`` (the line in the verifier's tokens, the spans it scores), read in one prefill
    with the log-probability of every token (``prompt_logprobs``), and the score at a position is the verifier's
    lowest probability of a marked token written up to there (``LikelihoodInput.scores``)."""

    kind = "verifier"

    def __init__(self, config: EngineConfig, reader: LikelihoodInput, *, seed: int, device: str = "cpu"):
        from vllm.v1.engine.async_llm import AsyncLLM

        self.config, self.reader, self.seed, self.device = config, reader, seed, device
        skip_logprob_token_text()
        self.engine = AsyncLLM.from_engine_args(_engine_args(config, seed=seed, device=device, prefix_caching=False))

    async def score(self, request: ScoreRequest) -> np.ndarray:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        line = self.reader.render(request)
        if len(line.token_ids) > self.config.max_model_len - 1:
            raise EngineError(f"bad score request: the line has {len(line.token_ids)} verifier tokens; the verifier "
                              f"reads at most {self.config.max_model_len - 1}")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, flat_logprobs=True,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        request_id = f"{request.request_id or 'score'}-{uuid.uuid4().hex[:8]}"
        prompt = TokensPrompt(prompt_token_ids=line.token_ids.tolist())
        final = await self._final(self.engine.generate(prompt, params, request_id=request_id), request_id)
        if final.prompt_logprobs is None:
            raise EngineError(f"score request {request_id} returned no prompt logprobs")
        return line.scores(_prompt_logprobs(final.prompt_logprobs, len(line.token_ids)))


class VLLMScorer(_ValueEngine):
    """A value model on vLLM's pooling runner, implementing ``search.protocol.Scorer``.

    A process reward model answers the ``token_classify`` task: per token, the probabilities of its labels (for
    Forest's value models: wrong, right; for Qwen2.5-Math-PRM-style models the same two classes). The score at a
    position is the probability of the last label ("right"). An outcome model (``*ForSequenceClassification``) answers
    the same task with its head applied at every token: its score at a position is that of the sequence cut there.
    A model that vLLM pools at its step tag only returns rows there (``score_rows``). Requests are batched by vLLM
    like generations.
    """

    kind = "value"

    def __init__(self, config: EngineConfig, *, seed: int, device: str = "cpu"):
        from vllm.v1.engine.async_llm import AsyncLLM

        self.config, self.seed, self.device = config, seed, device
        self.engine = AsyncLLM.from_engine_args(_engine_args(config, seed=seed, device=device, pooling=True))
        pooler = self.engine.model_config.pooler_config
        self.step_tag = None if pooler is None else pooler.step_tag_id

    async def score(self, request: ScoreRequest) -> np.ndarray:
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        ids = np.asarray(request.token_ids)
        positions = np.asarray(request.positions, dtype=np.int64)
        if len(ids) == 0 or len(ids) > self.config.max_model_len:
            raise EngineError(f"bad score request: {len(ids)} tokens; the value model takes 1 to "
                              f"{self.config.max_model_len}")
        if len(positions) == 0 or positions.min() < 0 or positions.max() >= len(ids):
            raise EngineError(f"bad score request: positions {positions.tolist()} outside 0..{len(ids) - 1}")
        request_id = f"{request.request_id or 'score'}-{uuid.uuid4().hex[:8]}"
        outputs = self.engine.encode(TokensPrompt(prompt_token_ids=ids.tolist()), PoolingParams(task="token_classify"),
                                     request_id=request_id)
        final = await self._final(outputs, request_id)
        probabilities = np.asarray(final.outputs.data.float().numpy() if hasattr(final.outputs.data, "numpy")
                                   else final.outputs.data, dtype=np.float32)
        return probabilities[score_rows(ids, positions, len(probabilities), self.step_tag), -1]
