"""The dataset format, in one place and without Ray: what a build writes and how it is read back.

- ``schema``: the Arrow schemas of the four part kinds (nodes, trees, pairs, errors);
- ``problems``: the input rows (``Problem``) and their reader (bad rows become ``InputError``);
- ``records``: search results turned into rows;
- ``layout``: where each file lives and how it is written atomically;
- ``writer``: ``DatasetWriter`` (the sink actor's body) and the manifest;
- ``reader``: committed parts, resume, the manifest, one tree;
- ``exports``: ``sft.jsonl`` and ``pairs.parquet``.

Modules are imported one by one (``from dataset.reader import read_tree``) so that reading a problems file does
not load pyarrow.
"""

__all__ = ["exports", "layout", "problems", "reader", "records", "schema", "writer"]
