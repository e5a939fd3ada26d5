"""``forest bench``: Forest's speed and memory as ratios measured within one run (``bench.benchmarks``), the
engines that drive the same search the way other designs do (``bench.engines``) and the replaying worker
(``bench.replay``)."""

__all__ = ["benchmarks", "engines", "replay"]
