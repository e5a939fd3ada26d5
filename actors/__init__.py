"""Ray actors and the worker pool every app opens.

``GeneratorWorker`` (one vLLM engine; the adapter is ``actors.vllm_engine``), ``TreeManager`` (many trees, one
``WorkerPool``), the sink (``actors.sink``, a ``dataset.writer.DatasetWriter`` actor) and ``open_pool``.
"""

from actors.generator import GeneratorWorker
from actors.pool import Pool, RemoteEngine, TreeEngine, WorkerPool, open_pool, start_generator_workers
from actors.sink import start_sink
from actors.tree_manager import ManagerSettings, TreeManager, TreeOutcome
from actors.vllm_engine import VLLMEngine, WorkerStats

__all__ = ["GeneratorWorker", "ManagerSettings", "Pool", "RemoteEngine", "TreeEngine", "TreeManager", "TreeOutcome",
           "VLLMEngine", "WorkerPool", "WorkerStats", "open_pool", "start_generator_workers", "start_sink"]
