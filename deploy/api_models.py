"""Request and response shapes of the online API (OpenAI-compatible where OpenAI defines them)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from search.driver import SearchResult
from search.final import line_finished, ranked_leaves
from search.prompts import OUTPUT_START, split_response
from search.protocol import NO_TOKEN, TOP_K
from search.strategies import STRATEGIES, VALUE_MODEL_STRATEGIES, Strategy
from search.tree import Tree

MODEL_PREFIX = "forest-"
"""A request's ``model`` names a strategy of the registry: ``forest-mcts-step`` is ``mcts-step``."""


def model_names(*, value_model: bool = True) -> list[str]:
    """The served model names; without a value model, not those of the strategies that need one."""
    return [MODEL_PREFIX + name for name in STRATEGIES if value_model or name not in VALUE_MODEL_STRATEGIES]


def strategy_for(model: str, *, value_model: bool = True) -> Strategy | None:
    """The strategy a model name stands for (None when it names none, or needs the value model that is missing)."""
    if not model.startswith(MODEL_PREFIX) or model not in model_names(value_model=value_model):
        return None
    return STRATEGIES[model.removeprefix(MODEL_PREFIX)]


MAX_STOP_SEQUENCES = 4  # as OpenAI allows
MAX_TOP_LOGPROBS = 20  # OpenAI's range; Forest stores the top TOP_K of each token
PART_SEPARATOR = "\n"  # between the text parts of one message's content


class ContentPart(BaseModel):
    """One part of a message's content; only ``{"type": "text", "text": ...}`` parts are supported."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart]

    @field_validator("content", mode="before")
    @classmethod
    def _text_or_parts(cls, value):
        if not isinstance(value, (str, list)):
            raise ValueError("content must be a string or a list of content parts")
        return value

    @property
    def text(self) -> str:
        """The content as text: text parts joined by newlines (other parts are refused by ``request_problem``)."""
        if isinstance(self.content, str):
            return self.content
        return PART_SEPARATOR.join(part.text or "" for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """OpenAI's chat request. Fields OpenAI defines are honoured or refused (``request_problem``); fields nobody
    defines are ignored, as OpenAI does; Forest's search settings may be added."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, description="Choices: the best n token-distinct lines of the tree, the chosen one first.")
    stop: str | list[str] | None = Field(None, description="Cut the answer text before the first of these strings.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_tokens: int | None = Field(None, ge=1, description="Most tokens of one reasoning path.")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name of max_tokens.")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    iterations: int | None = Field(None, ge=1, description="MCTS iterations (capped by the server).")
    budget_tokens: int | None = Field(None, ge=1, description="Generated-token budget (capped by the server).")
    children: int | None = Field(None, ge=1, le=8, description="k children per expansion.")
    seed: int | None = None

    @field_validator("stop", mode="after")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES or not all(stops):
            raise ValueError(f"stop takes 1 to {MAX_STOP_SEQUENCES} non-empty strings")
        return stops or None

    @property
    def path_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def prompt_role(role: str) -> str:
    """The chat-template role of a message: ``developer`` is OpenAI's newer name for ``system``."""
    return "system" if role == "developer" else role


def _given(value) -> bool:
    return value not in (None, False, 0, "", [], {})


UNSUPPORTED_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    # field: (is the value one Forest cannot honour?, why)
    "tools": (_given, "Forest has no tool calling"),
    "tool_choice": (lambda v: v not in (None, "none"), "Forest has no tool calling"),
    "functions": (_given, "Forest has no tool calling"),
    "function_call": (lambda v: v not in (None, "none"), "Forest has no tool calling"),
    "response_format": (lambda v: v is not None and not (isinstance(v, dict) and v.get("type") == "text"),
                        "only text answers (the text of <Output>) are supported"),
    "logit_bias": (_given, "the search's token statistics assume the model's own distribution"),
    "frequency_penalty": (_given, "the search's token statistics assume the model's own distribution"),
    "presence_penalty": (_given, "the search's token statistics assume the model's own distribution"),
    "audio": (_given, "Forest answers in text only"),
    "modalities": (lambda v: v not in (None, ["text"]), "Forest answers in text only"),
    "prediction": (_given, "predicted outputs are not supported"),
    "web_search_options": (lambda v: v is not None, "Forest does not search the web"),
    "store": (_given, "Forest does not store completions (GET /trees lists the recent trees)"),
    "reasoning_effort": (lambda v: v is not None, "set the search's budget_tokens or iterations instead"),
}
"""OpenAI request fields Forest cannot honour: a request that sets one answers 400 naming it."""

IGNORED_FIELDS = ("user", "metadata", "service_tier", "parallel_tool_calls", "safety_identifier",
                  "prompt_cache_key")
"""OpenAI request fields accepted without effect (bookkeeping that does not change an answer); the README lists
them. Fields OpenAI does not define are ignored too."""


def request_problem(body: ChatRequest, strategy: Strategy, *, max_choices: int) -> tuple[str, str] | None:
    """(field, reason) for the first field of ``body`` that Forest cannot honour, or None."""
    for name, value in (body.model_extra or {}).items():
        if name in UNSUPPORTED_FIELDS and UNSUPPORTED_FIELDS[name][0](value):
            return name, f"not supported: {UNSUPPORTED_FIELDS[name][1]}"
    for i, message in enumerate(body.messages):
        if message.role in ("tool", "function"):
            return f"messages.{i}.role", f"{message.role!r} messages are not supported: Forest has no tool calling"
        for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
            if part.type != "text" or part.text is None:
                return f"messages.{i}.content.{j}.type", \
                    f"content part of type {part.type!r} is not supported: only text parts (type 'text' with 'text')"
    if body.messages[-1].role != "user":
        return "messages", "the last message must come from the user"
    if body.max_tokens and body.max_completion_tokens and body.max_tokens != body.max_completion_tokens:
        return "max_completion_tokens", "differs from max_tokens (its older name): give one of them"
    if body.n > max_choices:
        return "n", f"{body.n} choices asked; this server returns at most {max_choices}"
    if body.n > 1 and strategy.one_line:
        return "n", f"{body.model} draws one line; ask a sampling or search model for n > 1"
    if body.top_logprobs is not None and not body.logprobs:
        return "top_logprobs", "needs logprobs: true"
    if body.top_logprobs is not None and body.top_logprobs > TOP_K:
        return "top_logprobs", f"{body.top_logprobs} asked; Forest keeps the top {TOP_K} of each token"
    return None


@dataclass(frozen=True, slots=True)
class Choice:
    """One returned line: the chosen one is index 0, the others are the tree's next best (``n``)."""

    index: int
    reasoning: str
    content: str
    finish_reason: str  # "stop": the line ended (or a stop string cut it); "length": a limit cut it
    logprobs: dict | None = None


def choices(result: SearchResult, body: ChatRequest, decode) -> list[Choice]:
    """The ``n`` lines a request gets, with ``stop`` applied to their answers and, asked for, their logprobs."""
    tree = result.tree
    leaves = [result.path[-1]] if body.n == 1 else ranked_leaves(tree, decode, result.path[-1], body.n)
    out = []
    for index, leaf in enumerate(leaves):
        response = result.response if index == 0 else decode(tree.path_token_ids(leaf).tolist())
        reasoning, answer = split_response(response)
        content, cut = apply_stop(answer or "", body.stop or ())
        finished = cut or line_finished(tree, leaf, response)
        logprobs = line_logprobs(tree, leaf, decode, content, body.top_logprobs or 0) if body.logprobs else None
        out.append(Choice(index, reasoning, content, "stop" if finished else "length", logprobs))
    return out


def apply_stop(text: str, stops) -> tuple[str, bool]:
    """``text`` up to the first occurrence of any stop string, and whether one cut it."""
    cut = min((i for i in (text.find(stop) for stop in stops) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def line_logprobs(tree: Tree, leaf: int, decode, content: str, top: int) -> dict:
    """OpenAI's logprobs object for a line: ``content`` holds the tokens of the answer text, ``reasoning_content``
    the tokens generated before it (the thought, tags included). Forced tokens (the reflection phrase), which the
    model did not sample, have logprob null."""
    columns = tree.path_tokens(leaf)
    texts = [decode([int(t)]) for t in columns["token_ids"]]
    ends = np.cumsum([len(t) for t in texts])
    joined = "".join(texts)
    output = joined.rfind(OUTPUT_START)  # the answer is the last <Output> block's
    at = joined.find(content, output + len(OUTPUT_START)) if content and output >= 0 else -1
    first = int(np.searchsorted(ends, at, side="right")) if at >= 0 else len(texts)
    last = int(np.searchsorted(ends, at + len(content), side="left")) + 1 if at >= 0 else len(texts)

    def entry(i: int) -> dict:
        logprob = float(columns["logprobs"][i])
        ids, lps = columns["top_ids"][i][:top], columns["top_logprobs"][i][:top]
        tops = [(int(t), float(lp)) for t, lp in zip(ids, lps, strict=True) if t != NO_TOKEN]
        return {"token": texts[i], "logprob": None if logprob != logprob else logprob,
                "bytes": list(texts[i].encode()),
                "top_logprobs": [{"token": decode([t]), "logprob": lp, "bytes": list(decode([t]).encode())}
                                 for t, lp in tops]}

    return {"content": [entry(i) for i in range(first, last)],
            "reasoning_content": [entry(i) for i in range(first)], "refusal": None}


def usage(result: SearchResult) -> dict:
    prompt = len(result.tree.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": result.stats.generated_tokens,
            "total_tokens": prompt + result.stats.generated_tokens}


def completion(result: SearchResult, model: str, request_id: str, lines: list[Choice]) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "finish_reason": c.finish_reason, "logprobs": c.logprobs,
                         "message": {"role": "assistant", "content": c.content, "reasoning_content": c.reasoning}}
                        for c in lines],
            "usage": usage(result), "forest": search_summary(result)}


def chunk(request_id: str, model: str, delta: dict, finish_reason: str | None = None, *, index: int = 0,
          logprobs: dict | None = None, **extra) -> dict:
    choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [choice], **extra}


def usage_chunk(request_id: str, model: str, result: SearchResult) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage (as OpenAI)."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [], "usage": usage(result)}


def search_summary(result: SearchResult) -> dict:
    value = None if result.value != result.value else result.value  # NaN -> null
    return {"iterations": result.stats.iterations, "nodes": result.tree.num_nodes, "value": value,
            "stop_reason": result.stop_reason.value, "seconds": round(result.stats.seconds, 4),
            "cached_prompt_tokens": result.stats.cached_prompt_tokens, "failed_checks": result.stats.failed_checks}


def tree_json(tree: Tree, decode, best_path: list[int]) -> dict:
    """The whole tree for ``/v1/search`` and the viewer: one object per node."""
    from dataset.schema import KIND_NAMES

    n = tree.nodes
    nodes = []
    for i in range(tree.num_nodes):
        visits = int(n["visits"][i])
        confidence = float(n["confidence"][i])
        nodes.append({"id": i, "parent": int(n["parent"][i]), "depth": int(n["depth"][i]),
                      "kind": KIND_NAMES[int(n["kind"][i])], "text": decode(tree.node_token_ids(i).tolist()),
                      "confidence": None if confidence != confidence else confidence, "visits": visits,
                      "value": float(n["value_sum"][i] / visits) if visits else None,
                      "terminal": bool(n["is_terminal"][i])})
    return {"nodes": nodes, "best_path": [int(i) for i in best_path]}


def index_row(request_id: str, body: ChatRequest, result: SearchResult) -> dict:
    """A recent request's row in the tree index (``/trees``): no reference answer, so no right or wrong."""
    value = None if result.value != result.value else result.value
    return {"tree_id": request_id, "href": f"trees/{request_id}", "question": body.messages[-1].text,
            "reference": None, "answer": result.answer, "correct": None, "value": value,
            "nodes": result.tree.num_nodes, "tokens": result.stats.generated_tokens,
            "seconds": round(result.stats.seconds, 4), "stop_reason": result.stop_reason.value,
            "model": body.model}


def progress(stats, best_value: float) -> dict:
    """A streamed progress event: iterations and tokens so far, the best root-child value."""
    return {"iterations": stats.iterations, "tokens": stats.generated_tokens,
            "best_value": None if best_value != best_value else round(best_value, 6)}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def new_request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"
