"""Reading a dataset back: committed parts, resume bookkeeping, the manifest and single trees."""

from __future__ import annotations

import json
import logging
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from pyarrow import fs as pafs

from dataset.layout import BEFORE_COMMIT, COMMIT, ERRORS, MANIFEST, NODES, PART_KINDS, TMP_PREFIX, TREES, open_output
from dataset.schema import ERROR_SCHEMA, NODE_SCHEMA, TREE_SCHEMA

log = logging.getLogger(__name__)


def _parts(filesystem: pafs.FileSystem, folder: str) -> list[pafs.FileInfo]:
    selector = pafs.FileSelector(folder, allow_not_found=True)
    return [f for f in filesystem.get_file_info(selector) if f.type == pafs.FileType.File]


def read_parts(filesystem: pafs.FileSystem, folder: str, schema: pa.Schema, columns=None) -> pa.Table:
    """All committed parts of one folder (temporary ``_tmp-`` files are ignored)."""
    paths = [f.path for f in _parts(filesystem, folder) if not f.base_name.startswith(("_", "."))]
    if not paths:
        return schema.empty_table().select(columns or schema.names)
    return ds.dataset(paths, filesystem=filesystem, format="parquet", schema=schema).to_table(columns=columns)


def read_kind(output: str, kind: str, schema: pa.Schema, columns=None) -> pa.Table:
    """The committed parts of one kind (``dataset.layout.PART_KINDS``) of the dataset at ``output``."""
    filesystem, root = open_output(output)
    return read_parts(filesystem, f"{root}/{kind}", schema, columns)


def remove_uncommitted(output: str) -> int:
    """Resume: delete temporary files and the parts a flush wrote before its commit but never committed."""
    filesystem, root = open_output(output)
    committed = {f.base_name for f in _parts(filesystem, f"{root}/{COMMIT}")}
    removed = 0
    for kind in PART_KINDS:
        for info in _parts(filesystem, f"{root}/{kind}"):
            orphan = kind in BEFORE_COMMIT and info.base_name not in committed
            if orphan or info.base_name.startswith(TMP_PREFIX):
                filesystem.delete_file(info.path)
                removed += 1
    if removed:
        log.info("resume: removed %d uncommitted files", removed)
    return removed


def committed_problem_ids(output: str) -> set[str]:
    table = read_kind(output, TREES, TREE_SCHEMA, columns=["problem_id"])
    return set(table.column("problem_id").to_pylist())


def recorded_errors(output: str) -> set[tuple[str, str, str]]:
    """(problem_id, stage, message) of every committed error row."""
    columns = ["problem_id", "stage", "message"]
    table = read_kind(output, ERRORS, ERROR_SCHEMA, columns=columns)
    return set(zip(*(table.column(c).to_pylist() for c in columns), strict=True))


def read_manifest(output: str) -> dict | None:
    filesystem, root = open_output(output)
    path = f"{root}/{MANIFEST}"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as f:
        return json.loads(f.read())


NODE_VIEW_COLUMNS = ["tree_id", "node_id", "parent_id", "depth", "kind", "text", "confidence", "visits", "value_sum",
                     "is_terminal", "weight", "exhausted"]
"""The node columns a reader of whole trees needs (not the per-token lists)."""


def read_tree(output: str, tree_id: str) -> tuple[dict, list[dict]]:
    """(tree row, its node rows in node-id order) of one committed tree; ``KeyError`` when there is none."""
    trees = read_kind(output, TREES, TREE_SCHEMA)
    trees = trees.filter(pc.equal(trees["tree_id"], tree_id))
    if trees.num_rows == 0:
        raise KeyError(f"no tree {tree_id!r} in {output}")
    nodes = read_kind(output, NODES, NODE_SCHEMA, columns=NODE_VIEW_COLUMNS)
    nodes = nodes.filter(pc.equal(nodes["tree_id"], tree_id)).sort_by("node_id")
    return trees.to_pylist()[0], nodes.to_pylist()



def read_trees(output: str) -> Iterator[tuple[dict, list[dict]]]:
    """Every committed tree: (tree row, its node rows in node-id order), in tree-id order; one read of each kind."""
    trees = read_kind(output, TREES, TREE_SCHEMA).sort_by("tree_id")
    nodes = read_kind(output, NODES, NODE_SCHEMA, columns=NODE_VIEW_COLUMNS)
    nodes = nodes.sort_by([("tree_id", "ascending"), ("node_id", "ascending")])
    spans: dict[str, list[int]] = {}  # tree id -> [first row, end row) of its nodes
    for i, tree_id in enumerate(nodes["tree_id"].to_pylist()):
        spans.setdefault(tree_id, [i, i])[1] = i + 1
    for row in trees.to_pylist():
        start, end = spans.get(row["tree_id"], (0, 0))
        yield row, nodes.slice(start, end - start).to_pylist()
