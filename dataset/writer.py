"""Writing a dataset: buffered trees and errors committed as Parquet parts (``dataset.layout``).

``DatasetWriter`` is a plain class: the build runs it as the sink actor (``actors.sink``), tests use it as it is.
"""

from __future__ import annotations

import json
import logging
import time

import pyarrow as pa

from dataset.layout import (ERRORS, MANIFEST, NODES, PAIRS, PART_KINDS, TREES, open_output, part_name,
                            write_atomically)
from dataset.schema import ERROR_SCHEMA, PAIR_SCHEMA, TREE_SCHEMA

log = logging.getLogger(__name__)


def write_manifest(output: str, manifest: dict) -> None:
    filesystem, root = open_output(output)
    filesystem.create_dir(root, recursive=True)
    write_atomically(filesystem, f"{root}/{MANIFEST}", data=json.dumps(manifest, indent=2, default=str).encode())


class DatasetWriter:
    """Buffers finished trees and errors; ``flush`` commits everything buffered (after ``flush_trees`` trees by
    itself)."""

    def __init__(self, output: str, *, session: str, flush_trees: int,
                 recorded: set[tuple[str, str, str]] | None = None):
        """``recorded``: (problem_id, stage, message) of the errors already committed by earlier sessions."""
        self.filesystem, self.root = open_output(output)
        for kind in PART_KINDS:
            self.filesystem.create_dir(f"{self.root}/{kind}", recursive=True)
        self.session, self.flush_trees = session, flush_trees
        self.seq = 0
        self.nodes: list[pa.Table] = []
        self.trees: list[dict] = []
        self.pairs: list[dict] = []
        self.errors: list[dict] = []
        self.committed_trees = self.committed_errors = 0
        self.received: set[str] = set()  # problem ids of this session's trees
        self.recorded = set(recorded or ())  # error keys committed before or received in this session

    def add_tree(self, nodes: pa.Table, tree: dict, pairs: list[dict]) -> None:
        """Buffer a finished tree. A problem's second tree is dropped: a manager that died after handing its tree
        over, but before the driver heard back, has that problem redone elsewhere."""
        if tree["problem_id"] in self.received:
            log.info("dropping a second tree for problem %s", tree["problem_id"])
            return
        self.received.add(tree["problem_id"])
        self.nodes.append(nodes)
        self.trees.append(tree)
        self.pairs.extend(pairs)
        if len(self.trees) >= self.flush_trees:
            self.flush()

    def add_errors(self, rows: list[dict]) -> None:
        """Buffer error rows, each (problem, stage, message) once: a manager that died after reporting a failure
        has that problem redone elsewhere, where it fails the same way."""
        for row in rows:
            key = (row["problem_id"], row["stage"], row["message"])
            if key not in self.recorded:
                self.recorded.add(key)
                self.errors.append(row)

    def flush(self) -> int:
        """Write buffered rows; returns the number of trees committed so far."""
        if not (self.trees or self.errors):
            return self.committed_trees
        start = time.monotonic()
        name = part_name(self.session, self.seq)
        self.seq += 1
        if self.trees:
            self._write(NODES, name, pa.concat_tables(self.nodes))
            self._write(PAIRS, name, pa.Table.from_pylist(self.pairs, schema=PAIR_SCHEMA))
            self._write(TREES, name, pa.Table.from_pylist(self.trees, schema=TREE_SCHEMA))  # the commit
            self.committed_trees += len(self.trees)
        if self.errors:
            self._write(ERRORS, name, pa.Table.from_pylist(self.errors, schema=ERROR_SCHEMA))
            self.committed_errors += len(self.errors)
        log.info("committed %d trees and %d errors in %.2fs", len(self.trees), len(self.errors),
                 time.monotonic() - start)
        self.nodes, self.trees, self.pairs, self.errors = [], [], [], []
        return self.committed_trees

    def _write(self, kind: str, name: str, table: pa.Table) -> None:
        write_atomically(self.filesystem, f"{self.root}/{kind}/{name}", table)

    def counts(self) -> dict:
        return {"trees": self.committed_trees, "errors": self.committed_errors}

