"""Typed configuration, one pydantic model per concern, loadable from YAML and validated at start.

Errors name the field (pydantic's messages carry the location; domain checks reuse the search core's
``ConfigError``). Each model turns itself into the plain arguments its part needs: the search core never sees
a config object.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from search.checks import EQUATION
from search.params import (Budget, ConfigError, FinalChoice, Granularity, MCTSParams, ReflectionPolicy, StepCheck,
                           ValueKind)
from search.prompts import DEFAULT_SYSTEM_PROMPT
from search.strategies import get_strategy, needs_value_model
from search.values import SCORED_VALUES

DEFAULT_MODEL_DIR = "models/forest-arith"  # bundled, trained by modelkit/train.py
DEFAULTS = MCTSParams()  # the search core's defaults: SearchConfig's fields start from these, never restated


CountOrAuto = Annotated[int, Field(ge=1)] | Literal["auto"]  # resolved by cluster.placement.resolve_auto


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineConfig(_Strict):
    """One vLLM engine (one GeneratorWorker)."""

    model: str = Field(DEFAULT_MODEL_DIR, description="Local path of a Hugging Face-format model directory.")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: cuda when Ray sees GPUs, else cpu.")
    dtype: str = Field("auto", description="vLLM dtype: auto, float32, bfloat16, float16. auto: the model's own dtype, "
                                           "except float32 models on CPUs without bfloat16 units run float32 (not "
                                           "vLLM's bfloat16, half as fast there); a build's manifest records what ran.")
    max_model_len: int = Field(2048, ge=16, description="Context length (prompt + generated) per sequence.")
    tensor_parallel_size: CountOrAuto = Field(
        1, description="GPUs per worker (one placement-group bundle each); auto: the fewest GPUs of one node whose "
                       "memory holds the weights twice over (weights + KV cache).")
    gpu_memory_gib: float = Field(80.0, gt=0, description="Memory of one GPU (for tensor_parallel_size: auto).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may use.")
    gpu_share: float = Field(1.0, gt=0, le=1, description="GPUs one worker claims from Ray when tensor_parallel_size "
                                                          "is 1; below 1 a small model shares a GPU (set "
                                                          "gpu_memory_utilization to match).")
    cpu_kvcache_gib: int = Field(1, ge=1, description="KV cache GiB on the CPU build (VLLM_CPU_KVCACHE_SPACE).")
    enforce_eager: bool = Field(False, description="Skip CUDA graphs / compilation: faster start, slower decode.")
    max_num_seqs: int = Field(256, ge=1, description="Sequences vLLM batches at once.")
    block_size: int | None = Field(None, ge=1, description="KV-cache block size in tokens; the prefix cache only "
                                   "reuses whole blocks. None: vLLM's default (16 on GPUs, 128 on the CPU build).")
    enable_prefix_caching: bool = Field(True, description="Reuse KV of shared prompt prefixes (tree ancestors).")
    seed: int = Field(0, description="Base seed; worker i uses seed + i, so workers sample differently.")
    pin_cpus: bool = Field(True, description="CPU build: the engine computes on a core of its own (the node's last "
                                             "cores, one per engine) and the processes that search stay off it, "
                                             "when the node has a core to spare (cluster/cpus.py).")

    def resolved_device(self, cluster_gpus: float) -> Literal["cuda", "cpu"]:
        if self.device == "auto":
            tp = 1 if self.tensor_parallel_size == "auto" else self.tensor_parallel_size
            return "cuda" if cluster_gpus >= tp else "cpu"
        return self.device


class SearchConfig(_Strict):
    """Marco-o1 MCTS settings (see ``search.params.MCTSParams`` for their meaning and defaults)."""

    granularity: str = Field(str(DEFAULTS.granularity), description="'step' or 'mini_step:N' (e.g. mini_step:64).")
    step_delimiter: str = Field(DEFAULTS.granularity.delimiter, description="Text that ends a step.")
    max_step_tokens: int = Field(DEFAULTS.granularity.tokens, description="Most tokens one step may take.")
    children: int = Field(DEFAULTS.children, description="k: children per expansion (one request with n=k).")
    exploration: float = Field(DEFAULTS.exploration, description="UCT exploration constant c.")
    max_depth: int = Field(DEFAULTS.max_depth, description="Depth at which a node is terminal.")
    max_path_tokens: int = Field(DEFAULTS.max_path_tokens,
                                 description="Generated tokens along one path before it is terminal.")
    parallel: int = Field(DEFAULTS.parallel, description="Iterations of one tree in flight at once (virtual loss).")
    temperature: float = Field(DEFAULTS.temperature, description="Sampling temperature.")
    top_p: float = Field(DEFAULTS.top_p, description="Nucleus sampling mass.")
    value: ValueKind = Field(DEFAULTS.value, description="How a state is valued.")
    reflection: str = Field(str(DEFAULTS.reflection), description="off | always | below:<value> | wrong_answer.")
    max_reflections: int = Field(DEFAULTS.max_reflections, description="Reflections allowed on one path.")
    final: FinalChoice = Field(DEFAULTS.final, description="How the answer is chosen from the tree's finished "
                               "lines: vote (value-weighted vote over their answers), best_value, most_visits.")
    normalize_values: bool = Field(DEFAULTS.normalize_values, description="Min-max normalise values over the tree "
                                   "before UCT (confidence values of one problem differ by hundredths).")
    unanswered_value: float = Field(DEFAULTS.unanswered_value, description="Value of a line that ends without an "
                                    "answer (cut by the path or depth limit).")
    widening: float = Field(DEFAULTS.widening, description="Progressive widening: a visited node may have children "
                            "+ floor(widening * sqrt(visits)) children, and one more once all its children failed; "
                            "0 turns it off.")
    max_width: int = Field(DEFAULTS.max_width, description="Most generated children of one node, widening included.")
    dedup: bool = Field(DEFAULTS.dedup, description="Merge a sample identical to a sibling into it (a weight) "
                        "instead of adding a second node.")
    refill_width: bool = Field(DEFAULTS.refill_width, description="When nothing is left to expand and budget "
                               "remains, every node's width cap (max_width) rises by one, so a search spends its "
                               "budget as best-of-N keeps sampling.")
    reward_weight: float = Field(DEFAULTS.reward_weight, description="value: reward_model: weight of the value "
                                 "model's score; the rest is the line's mean token confidence (1: the score alone).")
    step_check: StepCheck = Field(DEFAULTS.step_check, description="A tool that verifies each step: off, or "
                                  "arithmetic (every 'a op b = c' a line writes must hold). A tree search ends a "
                                  "line at a step that fails it (worth unanswered_value) and samples that step "
                                  "again; the sampling baselines choose among the samples that pass.")
    retry_temperature: float | None = Field(DEFAULTS.retry_temperature, description="Sampling temperature of the "
                                            "samples a tree search draws from a node after one of its steps failed "
                                            "step_check (unset: temperature): a model that erred at a step often "
                                            "repeats the error at a low temperature.")
    min_step_score: float | None = Field(DEFAULTS.min_step_score, description="With a value model (search.value: "
                                         "reward_model or reward_model_rollout): a step whose prefix the value "
                                         "model scores below this fails as a step_check failure does: its line "
                                         "answers nothing and its parent samples again (at retry_temperature). "
                                         "Unset: no such check.")
    stop_when_right: bool = Field(DEFAULTS.stop_when_right, description="A build (problems with reference "
                                  "answers): end a tree at its first finished line that answers the reference and "
                                  "passes step_check; the tree's response is that line. For data builds, where a "
                                  "right line is what is wanted; forest eval refuses it, requests without a "
                                  "reference ignore it.")
    iterations: int = Field(DEFAULTS.budget.iterations, description="Iteration budget per tree.")
    budget_tokens: int | None = Field(DEFAULTS.budget.tokens,
                                      description="Generated-token budget per tree (never exceeded).")
    budget_seconds: float | None = Field(DEFAULTS.budget.seconds, description="Wall-clock budget per tree.")
    early_stop: bool = Field(DEFAULTS.early_stop, description="final: most_visits only: stop once the root's "
                             "most-visited child is settled.")
    seed: int | None = Field(DEFAULTS.seed, description="Seed requests for reproducible searches.")
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, description="System message of the ChatML prompt.")

    @model_validator(mode="after")
    def _check(self) -> "SearchConfig":
        self.to_params()  # raises ConfigError naming the field
        return self

    def to_params(self, *, granularity: str | None = None, value: str | None = None) -> MCTSParams:
        """The search core's parameters; ``granularity`` and ``value`` override the configured ones (a strategy
        preset's)."""
        return MCTSParams(
            granularity=Granularity.parse(granularity or self.granularity, max_step_tokens=self.max_step_tokens,
                                          delimiter=self.step_delimiter),
            children=self.children, exploration=self.exploration, max_depth=self.max_depth,
            max_path_tokens=self.max_path_tokens, parallel=self.parallel, temperature=self.temperature,
            top_p=self.top_p, value=ValueKind(value) if value else self.value,
            reflection=ReflectionPolicy.parse(self.reflection), max_reflections=self.max_reflections, final=self.final,
            budget=Budget(self.iterations, self.budget_tokens, self.budget_seconds), early_stop=self.early_stop,
            seed=self.seed, normalize_values=self.normalize_values, unanswered_value=self.unanswered_value,
            widening=self.widening, max_width=self.max_width, dedup=self.dedup, refill_width=self.refill_width,
            reward_weight=self.reward_weight, step_check=self.step_check,
            retry_temperature=self.retry_temperature, stop_when_right=self.stop_when_right,
            min_step_score=self.min_step_score)


LATER_SEARCH_FIELDS = ("step_check", "retry_temperature", "stop_when_right", "min_step_score")
"""Search settings added after builds had written outputs: left out of a build's identity at their defaults."""


class BuildConfig(_Strict):
    """A dataset build: where problems come from, where trees go, and how the work is spread."""

    input: str | None = Field(None, description="Problems file: JSONL or Parquet (local path or URI).")
    output: str | None = Field(None, description="Output directory (local path or pyarrow filesystem URI).")
    id_field: str = Field("id", description="Input field holding the problem id.")
    question_field: str = Field("question", description="Input field holding the question.")
    answer_field: str = Field("answer", description="Input field holding the reference answer (optional).")
    limit: int | None = Field(None, ge=1, description="Build at most this many problems.")
    managers: CountOrAuto = Field(
        1, description="TreeManager actors; problems are partitioned among them. auto: one per "
                       "cluster.placement.GPUS_PER_MANAGER workers (the sizing rule in docs/scaling.md).")
    max_active_trees: int = Field(64, ge=1, description="Trees one manager searches at once (bounds memory).")
    flush_trees: int = Field(64, ge=1, description="Commit to Parquet after this many finished trees.")
    flush_seconds: float = Field(10.0, gt=0, description="... or after this many seconds.")
    strategy: str = Field("mcts", description="What each tree runs (search.strategies): 'mcts' (the configured "
                                              "search), a preset such as 'mcts-step', or a baseline such as "
                                              "'best_of_n' (rejection-sampling data at the same token budget).")

    @model_validator(mode="after")
    def _known_strategy(self) -> "BuildConfig":
        get_strategy(self.strategy)  # ConfigError naming the choices
        return self


class ServeConfig(_Strict):
    """The online endpoint: where it listens and the limits that keep it healthy."""

    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    api_key: str | None = Field(None, description="Bearer token required on /v1 routes (or FOREST_API_KEY).")
    max_concurrent_searches: int = Field(32, ge=1, description="Searches at once; more get 429 + Retry-After.")
    max_ongoing_requests: int = Field(256, ge=1, description="Serve's per-replica request limit (default 5 is "
                                                              "far too low for long searches).")
    retry_after_s: int = Field(2, ge=1, description="Retry-After seconds on a 429.")
    request_timeout_s: float = Field(120.0, gt=0, description="Wall-clock budget of one search.")
    max_iterations: int = Field(64, ge=1, description="Cap on a request's iterations.")
    max_budget_tokens: int = Field(16384, ge=1, description="Cap on a request's generated-token budget.")
    max_path_tokens: int = Field(DEFAULTS.max_path_tokens, ge=1,
                                 description="Cap on a request's max_tokens (per reasoning path).")
    recent_trees: int = Field(32, ge=0, description="Finished trees kept for the tree viewer.")
    max_choices: int = Field(8, ge=1, description="Cap on a request's n (choices: distinct lines of one tree).")


class ValueInputConfig(_Strict):
    """How an off-the-shelf process reward model reads a line: in its own chat template, each step followed by its
    step separator, the score read at the separator after the line's last step (the lines are split into steps at
    ``search.step_delimiter``). Without it the value model reads the policy's tokens as they are (Forest's own value
    models)."""

    step_separator: str = Field(min_length=1, description="Text written after every step, where the PRM scores "
                                "(Qwen2.5-Math-PRM: <extra_0>).")
    system_prompt: str | None = Field(None, description="The PRM's system message in place of the search's "
                                      "(Qwen2.5-Math-PRM: 'Please reason step by step, and put your final answer "
                                      "within \\boxed{}.'); None keeps the search's.")


class LikelihoodConfig(_Strict):
    """A verifier served by likelihood: ``value_model`` is a causal LM (e.g. one `forest train-verifier` wrote; a
    causal LM is served so without this block too, with the default spans) that reads each line without its
    prompt, and the value at a position is its lowest probability of a token of the marked spans written up to
    there (1 where none is): with the default spans, of the results the line's equations claim."""

    spans: str = Field(EQUATION.pattern, description="A regular expression: the text the verifier scores, its named "
                       "groups in each match (the whole match when it names none); default: the result and "
                       "remainder of every 'a op b = c' (search.checks.EQUATION).")

    @field_validator("spans")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from exc
        return value


class ForestConfig(_Strict):
    """A whole run: the engine, the search, the build, the endpoint, and the worker pool they share."""

    engine: EngineConfig = EngineConfig()
    search: SearchConfig = SearchConfig()
    build: BuildConfig = BuildConfig()
    serve: ServeConfig = ServeConfig()
    workers: CountOrAuto = Field(
        1, description="GeneratorWorkers (vLLM engines) to start; auto: one per tensor_parallel_size GPUs of a node "
                       "(one on a cluster without GPUs).")
    attach_workers: list[str] = Field(default_factory=list, description="Names of running GeneratorWorkers to "
                                      "use instead of starting new ones (a pool shared by builds and serving).")
    max_in_flight_per_worker: int = Field(128, ge=1, description="Engine requests in flight per worker, for every "
                                          "app (vLLM reaches its throughput with many concurrent sequences).")
    value_model: EngineConfig | None = Field(None, description="The value model (a process reward model, e.g. one "
                                             "`forest train-value` wrote, or Qwen2.5-Math-PRM-7B by path) served by "
                                             "ValueWorkers on vLLM's pooling runner; needed by search.value: "
                                             "reward_model and the strategies best_of_n-prm and mcts-prm.")
    value_workers: int = Field(1, ge=1, description="ValueWorkers to start when value_model is set.")
    value_input: ValueInputConfig | None = Field(None, description="The input format of a value model trained on "
                                                 "another one (an off-the-shelf PRM); None: the policy's tokens.")
    value_likelihood: LikelihoodConfig | None = Field(None, description="How a verifier (value_model a causal LM, "
                                                      "served by likelihood) reads a line; None: the default spans "
                                                      "for a causal LM, vLLM's pooling runner for a reward model.")

    @model_validator(mode="after")
    def _check_value_model(self) -> "ForestConfig":
        if self.search.value in SCORED_VALUES and self.value_model is None:
            raise ConfigError("search.value", self.search.value.value, "needs a value model: set value_model.model")
        strategy = get_strategy(self.build.strategy)
        if self.value_model is None and needs_value_model(strategy, self.search.to_params(**strategy.preset)):
            raise ConfigError("build.strategy", strategy.name, "needs a value model: set value_model.model")
        if self.value_input is not None and self.value_model is None:
            raise ConfigError("value_input", self.value_input.step_separator, "describes a value model's input: "
                              "set value_model.model")
        if self.value_likelihood is not None and self.value_model is None:
            raise ConfigError("value_likelihood", self.value_likelihood.spans, "describes how a value model is "
                              "read: set value_model.model")
        if self.value_likelihood is not None and self.value_input is not None:
            raise ConfigError("value_input", self.value_input.step_separator, "is a reward model's input format; a "
                              "verifier served by likelihood (value_likelihood) reads the line as it is")
        return self

    def search_identity(self) -> dict:
        """What decides the trees' content (hashed; a resumed build must match it)."""
        search = self.search.model_dump(mode="json")
        for name in LATER_SEARCH_FIELDS:  # at their defaults, older outputs keep their hash
            if getattr(self.search, name) == SearchConfig.model_fields[name].default:
                del search[name]
        identity = {"model": self.engine.model, "dtype": self.engine.dtype, "search": search}
        if self.build.strategy != BuildConfig.model_fields["strategy"].default:  # older outputs keep their hash
            identity["strategy"] = self.build.strategy
        if self.value_model is not None and self.search.value in SCORED_VALUES:
            identity["value_model"] = self.value_model.model
            if self.value_input is not None:  # absent otherwise, so older outputs keep their hash
                identity["value_input"] = self.value_input.model_dump()
            if self.value_likelihood is not None:
                identity["value_likelihood"] = self.value_likelihood.model_dump()
        return identity


def load_config(path: str | Path | None = None, **overrides) -> ForestConfig:
    """Read a YAML file (or the defaults) and apply dotted overrides such as ``{"search.iterations": 8}``."""
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    data = data or {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return ForestConfig.model_validate(data)
