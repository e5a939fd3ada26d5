"""Request and response shapes of the online API (OpenAI-compatible where OpenAI defines them)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from search.driver import SearchResult
from search.prompts import split_response
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


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    """OpenAI's chat request; fields Forest does not use are ignored, search settings may be added."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, description="Most tokens of one reasoning path.")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    iterations: int | None = Field(None, ge=1, description="MCTS iterations (capped by the server).")
    budget_tokens: int | None = Field(None, ge=1, description="Generated-token budget (capped by the server).")
    children: int | None = Field(None, ge=1, le=8, description="k children per expansion.")
    seed: int | None = None


def usage(result: SearchResult) -> dict:
    prompt = len(result.tree.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": result.stats.generated_tokens,
            "total_tokens": prompt + result.stats.generated_tokens}


def completion(result: SearchResult, model: str, request_id: str) -> dict:
    reasoning, answer = split_response(result.response)
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": answer if answer is not None else "",
                                     "reasoning_content": reasoning}}],
            "usage": usage(result), "forest": search_summary(result)}


def chunk(request_id: str, model: str, delta: dict, finish_reason: str | None = None, **extra) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}


def search_summary(result: SearchResult) -> dict:
    value = None if result.value != result.value else result.value  # NaN -> null
    return {"iterations": result.stats.iterations, "nodes": result.tree.num_nodes, "value": value,
            "stop_reason": result.stop_reason.value, "seconds": round(result.stats.seconds, 4),
            "cached_prompt_tokens": result.stats.cached_prompt_tokens}


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


def progress(stats, best_value: float) -> dict:
    """A streamed progress event: iterations and tokens so far, the best root-child value."""
    return {"iterations": stats.iterations, "tokens": stats.generated_tokens,
            "best_value": None if best_value != best_value else round(best_value, 6)}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def new_request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"
