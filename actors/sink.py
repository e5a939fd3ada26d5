"""The sink: the Ray actor that writes a build's dataset (``dataset.writer.DatasetWriter`` as an actor)."""

from __future__ import annotations

from dataset.writer import DatasetWriter


def start_sink(output: str, *, session: str, flush_trees: int, recorded: set[tuple[str, str, str]] | None = None):
    """A ``DatasetWriter`` actor for ``output``, placed where that output is reachable (``cluster.placement``)."""
    import ray

    from cluster.placement import sink_placement

    return ray.remote(DatasetWriter).options(**sink_placement(output)).remote(output, session=session,
                                                                               flush_trees=flush_trees,
                                                                               recorded=recorded)
