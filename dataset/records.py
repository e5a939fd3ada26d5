"""Search results as Arrow rows: one row per node, one row per tree, preference pairs, errors.

Node rows come straight from the tree's columnar arrays (token ranges become list offsets), so no Python
object is made per token.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa

from dataset.problems import Problem
from dataset.schema import KIND_NAMES, NODE_SCHEMA
from search.driver import SearchResult
from search.mcts import most_visited_path
from search.prompts import answers_match
from search.protocol import TOP_K
from search.tree import ROOT, Tree


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _token_lists(tree: Tree, name: str, value_type: pa.DataType, offsets: np.ndarray) -> pa.Array:
    values = tree.tokens[name][: tree.num_tokens]
    if values.ndim == 2:
        flat = pa.array(values.reshape(-1), type=value_type.value_type)
        inner = pa.FixedSizeListArray.from_arrays(flat, TOP_K)
    else:
        inner = pa.array(values, type=value_type)
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), inner)


def node_table(tree: Tree, *, run_id: str, tree_id: str, decode) -> pa.Table:
    """One row per node. Token ranges are contiguous in creation order, so they are the list offsets."""
    n, cols = tree.num_nodes, tree.columns()
    offsets = np.append(cols["token_start"], cols["token_end"][-1]).astype(np.int64)
    texts = [decode(tree.node_token_ids(i).tolist()) for i in range(n)]
    return pa.table({
        "run_id": pa.array([run_id] * n, pa.string()), "tree_id": pa.array([tree_id] * n, pa.string()),
        "node_id": np.arange(n, dtype=np.int32), "parent_id": cols["parent"].astype(np.int32),
        "depth": cols["depth"].astype(np.int32),
        "kind": pa.array([KIND_NAMES[int(k)] for k in cols["kind"]], pa.string()),
        "token_ids": _token_lists(tree, "token_ids", pa.int32(), offsets),
        "logprobs": _token_lists(tree, "logprobs", pa.float32(), offsets),
        "top_ids": _token_lists(tree, "top_ids", NODE_SCHEMA.field("top_ids").type.value_type, offsets),
        "top_logprobs": _token_lists(tree, "top_logprobs", NODE_SCHEMA.field("top_logprobs").type.value_type,
                                     offsets),
        "confidence": cols["confidence"].astype(np.float32), "visits": cols["visits"].astype(np.int32),
        "value_sum": cols["value_sum"], "is_terminal": cols["is_terminal"], "text": pa.array(texts, pa.string()),
        "weight": cols["weight"].astype(np.int32), "exhausted": cols["exhausted"],
    }, schema=NODE_SCHEMA)


def tree_row(result: SearchResult, problem: Problem, *, run_id: str, tree_id: str, strategy: str, model: str,
             config_hash_: str) -> dict:
    stats = result.stats
    correct = None if problem.answer is None else answers_match(result.answer, problem.answer)
    return {
        "run_id": run_id, "tree_id": tree_id, "problem_id": problem.problem_id, "question": problem.question,
        "prompt_token_ids": result.tree.prompt_token_ids.tolist(), "reference_answer": problem.answer,
        "best_path": [int(i) for i in result.path], "response": result.response, "final_answer": result.answer,
        "correct": correct, "value": None if np.isnan(result.value) else float(result.value),
        "num_nodes": result.tree.num_nodes, "iterations": stats.iterations,
        "tokens_generated": stats.generated_tokens, "prompt_tokens": stats.prompt_tokens,
        "cached_prompt_tokens": stats.cached_prompt_tokens, "requests": stats.requests, "seconds": stats.seconds,
        "stop_reason": result.stop_reason.value, "strategy": strategy, "model": model, "config_hash": config_hash_,
    }


def _subtree_text(tree: Tree, node: int, decode) -> tuple[str, float]:
    """A sibling's continuation: the node's tokens, then greedily its most-visited line."""
    path = most_visited_path(tree, start=node)
    ids = np.concatenate([tree.node_token_ids(i) for i in path])
    return decode(ids.tolist()), tree.mean_value(node)


def preference_pairs(result: SearchResult, problem: Problem, *, run_id: str, tree_id: str, decode) -> list[dict]:
    """Along the chosen path, each chosen node against its lowest-valued visited sibling (for DPO)."""
    tree, rows = result.tree, []
    for parent, chosen in zip(result.path, result.path[1:], strict=False):
        siblings = [int(s) for s in tree.children(parent) if s != chosen and tree.nodes["visits"][s] > 0]
        if not siblings:
            continue
        rejected = min(siblings, key=tree.mean_value)
        chosen_text, chosen_value = _subtree_text(tree, chosen, decode)
        rejected_text, rejected_value = _subtree_text(tree, rejected, decode)
        if not chosen_value > rejected_value:
            continue
        prefix = decode(tree.path_token_ids(parent).tolist()) if parent != ROOT else ""
        rows.append({"run_id": run_id, "tree_id": tree_id, "problem_id": problem.problem_id,
                     "prompt": problem.question + "\n" + prefix if prefix else problem.question,
                     "chosen": chosen_text, "rejected": rejected_text, "chosen_value": chosen_value,
                     "rejected_value": rejected_value, "depth": int(tree.nodes["depth"][chosen]),
                     "question": problem.question, "prefix": prefix})
    return rows


def error_row(run_id: str, problem_id: str, stage: str, message: str) -> dict:
    return {"run_id": run_id, "problem_id": problem_id, "stage": stage, "message": message}
