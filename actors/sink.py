"""ParquetSink: buffers finished trees and writes them as Parquet parts under one output directory.

Layout (``OUT`` is a local path or any pyarrow filesystem URI such as ``s3://bucket/run``)::

    OUT/nodes/part-<session>-<seq>.parquet    one row per node
    OUT/pairs/part-<session>-<seq>.parquet    preference pairs of the same trees
    OUT/trees/part-<session>-<seq>.parquet    one row per tree: the commit marker, written last
    OUT/errors/part-<session>-<seq>.parquet   bad input and failed trees

Every file is written under a ``_tmp-`` name (ignored by Parquet dataset readers) and renamed when complete.
A flush writes nodes and pairs before the trees part with the same name, so a crash leaves at most node
parts without a trees part; resume deletes those (``deploy.dataset.remove_uncommitted``).
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from actors.records import ERROR_SCHEMA, PAIR_SCHEMA, TREE_SCHEMA

log = logging.getLogger(__name__)

PART_KINDS = ("nodes", "pairs", "trees", "errors")


def open_output(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path) for a local path or a filesystem URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    import os
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def write_atomically(filesystem: pafs.FileSystem, path: str, table: pa.Table | None = None,
                     data: bytes | None = None) -> None:
    """Write ``table`` as Parquet (or raw ``data``) to a temporary name in the same folder, then rename."""
    folder, _, name = path.rpartition("/")
    tmp = f"{folder}/_tmp-{name}"
    with filesystem.open_output_stream(tmp) as out:
        if table is not None:
            pq.write_table(table, out, compression="zstd")
        else:
            out.write(data)
    filesystem.move(tmp, path)


class ParquetSink:
    """Plain class behind the sink actor; ``flush`` commits everything buffered."""

    def __init__(self, output: str, *, session: str, flush_trees: int = 64):
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
        self.errors.extend(rows)

    def flush(self) -> int:
        """Write buffered rows; returns the number of trees committed so far."""
        if not (self.trees or self.errors):
            return self.committed_trees
        start = time.monotonic()
        name = f"part-{self.session}-{self.seq:06d}.parquet"
        self.seq += 1
        if self.trees:
            self._write("nodes", name, pa.concat_tables(self.nodes))
            self._write("pairs", name, pa.Table.from_pylist(self.pairs, schema=PAIR_SCHEMA))
            self._write("trees", name, pa.Table.from_pylist(self.trees, schema=TREE_SCHEMA))  # the commit
            self.committed_trees += len(self.trees)
        if self.errors:
            self._write("errors", name, pa.Table.from_pylist(self.errors, schema=ERROR_SCHEMA))
            self.committed_errors += len(self.errors)
        log.info("committed %d trees and %d errors in %.2fs", len(self.trees), len(self.errors),
                 time.monotonic() - start)
        self.nodes, self.trees, self.pairs, self.errors = [], [], [], []
        return self.committed_trees

    def _write(self, kind: str, name: str, table: pa.Table) -> None:
        write_atomically(self.filesystem, f"{self.root}/{kind}/{name}", table)

    def counts(self) -> dict:
        return {"trees": self.committed_trees, "errors": self.committed_errors}

