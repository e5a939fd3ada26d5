"""A hand-made build output (trees and nodes Parquet) for tests of what is read from builds."""

import pyarrow as pa
import pyarrow.parquet as pq

from dataset.layout import NODES, TREES
from dataset.schema import NODE_SCHEMA, TREE_SCHEMA

PROMPT = [7, 8, 9]


def node(node_id, parent_id, tokens, text, terminal=False):
    return {"node_id": node_id, "parent_id": parent_id, "token_ids": tokens, "text": text, "is_terminal": terminal}


# root -> A -> {A1: answers 5 (right), A2: answers 6}; root -> B -> B1: answers 6; root -> C: cut, no answer
NODES_OF_TREE = [
    node(0, -1, [], ""),
    node(1, 0, [10, 11], "<Thought>\nstep A\n\n"),
    node(2, 1, [12, 13, 14], "</Thought>\n<Output>\n5\n</Output>", terminal=True),
    node(3, 1, [15, 16], "</Thought>\n<Output>\n6\n</Output>", terminal=True),
    node(4, 0, [17], "<Thought>\nstep B\n\n"),
    node(5, 4, [18, 19], "</Thought>\n<Output>\n6\n</Output>", terminal=True),
    node(6, 0, [20, 21, 22], "<Thought>\nstep C that runs out", terminal=True),
]


def write_build(root, reference, problems=("p1",), nodes=None) -> str:
    """One tree per problem, of ``nodes[problem]`` where given, else of ``NODES_OF_TREE``; each prompt ends in its own
    token; every answer is ``reference``."""
    nodes = nodes or {}
    for kind in (TREES, NODES):
        (root / kind).mkdir(parents=True)
    trees = [{name: None for name in TREE_SCHEMA.names} | {
        "run_id": "r", "tree_id": f"t-{p}", "problem_id": p, "prompt_token_ids": [*PROMPT[:-1], PROMPT[-1] + i],
        "reference_answer": reference} for i, p in enumerate(problems)]
    pq.write_table(pa.Table.from_pylist(trees, schema=TREE_SCHEMA), root / TREES / "part-0.parquet")
    rows = [{name: None for name in NODE_SCHEMA.names} | n | {"run_id": "r", "tree_id": f"t-{p}"}
            for p in problems for n in nodes.get(p, NODES_OF_TREE)]
    pq.write_table(pa.Table.from_pylist(rows, schema=NODE_SCHEMA), root / NODES / "part-0.parquet")
    return str(root)
