"""The dataset's contract: the Arrow schemas of its four part kinds (see the README's output table)."""

from __future__ import annotations

import pyarrow as pa

from search.protocol import TOP_K
from search.tree import NodeKind

KIND_NAMES = {k.value: k.name.lower() for k in NodeKind}

NODE_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("tree_id", pa.string()), ("node_id", pa.int32()), ("parent_id", pa.int32()),
    ("depth", pa.int32()), ("kind", pa.string()), ("token_ids", pa.list_(pa.int32())),
    ("logprobs", pa.list_(pa.float32())), ("top_ids", pa.list_(pa.list_(pa.int32(), TOP_K))),
    ("top_logprobs", pa.list_(pa.list_(pa.float32(), TOP_K))), ("confidence", pa.float32()),
    ("visits", pa.int32()), ("value_sum", pa.float64()), ("is_terminal", pa.bool_()), ("text", pa.string()),
    ("weight", pa.int32()), ("exhausted", pa.bool_()),
])
TREE_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("tree_id", pa.string()), ("problem_id", pa.string()), ("question", pa.string()),
    ("prompt_token_ids", pa.list_(pa.int32())), ("reference_answer", pa.string()),
    ("best_path", pa.list_(pa.int32())), ("response", pa.string()), ("final_answer", pa.string()),
    ("correct", pa.bool_()), ("value", pa.float64()), ("num_nodes", pa.int32()), ("iterations", pa.int32()),
    ("tokens_generated", pa.int64()), ("prompt_tokens", pa.int64()), ("cached_prompt_tokens", pa.int64()),
    ("requests", pa.int32()), ("seconds", pa.float64()), ("stop_reason", pa.string()), ("strategy", pa.string()),
    ("model", pa.string()), ("config_hash", pa.string()),
])
PAIR_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("tree_id", pa.string()), ("problem_id", pa.string()), ("prompt", pa.string()),
    ("chosen", pa.string()), ("rejected", pa.string()), ("chosen_value", pa.float64()),
    ("rejected_value", pa.float64()), ("depth", pa.int32()),
    ("question", pa.string()), ("prefix", pa.string()),  # prompt, split: the chat prompt is rebuilt from them (DPO)
])
ERROR_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("problem_id", pa.string()), ("stage", pa.string()), ("message", pa.string()),
])
