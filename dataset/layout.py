"""Where a dataset's files live, and how each one is written so that readers never see half of it.

Layout (``OUT`` is a local path or any pyarrow filesystem URI such as ``s3://bucket/run``)::

    OUT/nodes/part-<session>-<seq>.parquet    one row per node
    OUT/pairs/part-<session>-<seq>.parquet    preference pairs of the same trees
    OUT/trees/part-<session>-<seq>.parquet    one row per tree: the commit marker, written last
    OUT/errors/part-<session>-<seq>.parquet   bad input and failed trees
    OUT/manifest.json, OUT/sft.jsonl, OUT/pairs.parquet

Every file is written under a ``_tmp-`` name (ignored by Parquet dataset readers) and renamed when complete.
A flush writes the nodes and pairs parts before the trees part of the same name, so a crash leaves at most
parts of ``BEFORE_COMMIT`` kinds without a trees part; resume deletes those (``dataset.reader.remove_uncommitted``).
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

NODES, PAIRS, TREES, ERRORS = "nodes", "pairs", "trees", "errors"
PART_KINDS = (NODES, PAIRS, TREES, ERRORS)
BEFORE_COMMIT = (NODES, PAIRS)  # written before their trees part, so orphaned when a flush dies
COMMIT = TREES
TMP_PREFIX = "_tmp-"
MANIFEST = "manifest.json"
SFT_EXPORT = "sft.jsonl"
PAIRS_EXPORT = "pairs.parquet"
COMPRESSION = "zstd"


def open_output(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path) for a local path or a filesystem URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def part_name(session: str, seq: int) -> str:
    """The file name shared by the parts of one flush (one per kind)."""
    return f"part-{session}-{seq:06d}.parquet"


def write_atomically(filesystem: pafs.FileSystem, path: str, table: pa.Table | None = None,
                     data: bytes | None = None) -> None:
    """Write ``table`` as Parquet (or raw ``data``) to a temporary name in the same folder, then rename."""
    folder, _, name = path.rpartition("/")
    tmp = f"{folder}/{TMP_PREFIX}{name}"
    with filesystem.open_output_stream(tmp) as out:
        if table is not None:
            pq.write_table(table, out, compression=COMPRESSION)
        else:
            out.write(data)
    filesystem.move(tmp, path)
