"""Where Forest's actors run, and how many: Ray actor options from the config and the cluster's resources.

One worker per GPU by default (``num_gpus=1``; ``engine.gpu_share`` lets a small model, such as a value model, share
a GPU). A tensor-parallel worker gets a placement group with one
GPU bundle per shard, packed on one node (STRICT_PACK); the actor itself holds no GPU and vLLM's Ray executor
starts the shards inside the group. On the CPU build a worker takes ``CPUS_PER_CPU_WORKER`` CPUs.
``resolve_auto`` turns ``auto`` counts into numbers; ``sink_placement`` keeps a local output on the driver's node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cluster.config import EngineConfig, ForestConfig

CPUS_PER_CPU_WORKER = 1.0
GPUS_PER_MANAGER = 1  # workers one TreeManager feeds: a real manager's rate in a build (docs/scaling.md)


@dataclass(frozen=True, slots=True)
class ClusterShape:
    """What ``auto`` looks at: the GPUs of each alive node."""

    node_gpus: tuple[int, ...]

    @classmethod
    def current(cls) -> "ClusterShape":
        import ray
        return cls(tuple(int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["Alive"]))

    @property
    def gpus(self) -> int:
        return sum(self.node_gpus)


def model_weight_bytes(model: str) -> int:
    """Bytes of the weight files in a local model directory (0 when it is not local)."""
    path = Path(model)
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.pt") for f in path.glob(pattern))


def auto_tensor_parallel(weight_bytes: int, gpu_memory_gib: float, max_node_gpus: int) -> int:
    """The smallest power of two of GPUs whose memory holds the weights twice (weights + as much KV cache)."""
    need = max(1, math.ceil(2 * weight_bytes / (gpu_memory_gib * 2**30)))
    tp = 1 << (need - 1).bit_length()
    if max_node_gpus and tp > max_node_gpus:
        raise ValueError(f"engine.tensor_parallel_size=auto: the weights ({weight_bytes / 2**30:.1f} GiB) need "
                         f"{tp} GPUs of {gpu_memory_gib} GiB on one node, but the largest node has {max_node_gpus}")
    return tp


def resolve_auto(config: ForestConfig, shape: ClusterShape | None = None) -> ForestConfig:
    """The config with every ``auto`` count replaced by a number derived from the cluster."""
    engine, build = config.engine, config.build
    if "auto" not in (config.workers, build.managers, engine.tensor_parallel_size):
        return config
    shape = shape or ClusterShape.current()
    on_gpus = engine.resolved_device(shape.gpus) == "cuda"
    tp = engine.tensor_parallel_size
    if tp == "auto":
        tp = auto_tensor_parallel(model_weight_bytes(engine.model), engine.gpu_memory_gib,
                                  max(shape.node_gpus, default=0)) if on_gpus else 1
    workers = config.workers
    if workers == "auto":  # a TP group never spans nodes, so count whole groups per node
        workers = max(1, sum(g // tp for g in shape.node_gpus)) if on_gpus else 1
    managers = build.managers
    if managers == "auto":
        managers = max(1, math.ceil(workers / GPUS_PER_MANAGER))
    return config.model_copy(update={
        "workers": workers, "engine": engine.model_copy(update={"tensor_parallel_size": tp}),
        "build": build.model_copy(update={"managers": managers})})


def manager_placement() -> dict:
    """TreeManagers reserve no CPU and spread over the nodes: a manager needs about a core per GPU it feeds
    (docs/scaling.md), which GPU nodes' spare cores have and a small head node does not."""
    return {"num_cpus": 0, "scheduling_strategy": "SPREAD"}


def sink_placement(output: str) -> dict:
    """Ray options for the ParquetSink: a local path is only reachable on the driver's node, so pin the sink
    there; a filesystem URI (s3://, gs://, ...) is reachable from any node."""
    if "://" in output and not output.startswith("file://"):
        return {"num_cpus": 0}
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False)}


def worker_placement(config: EngineConfig, *, device: str, index: int) -> dict:
    """Ray ``.options(...)`` for worker ``index``."""
    if device == "cpu":
        return {"num_cpus": CPUS_PER_CPU_WORKER, "num_gpus": 0}
    if config.tensor_parallel_size == 1:
        return {"num_cpus": 1, "num_gpus": config.gpu_share}
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundles = [{"GPU": 1, "CPU": 1}] + [{"GPU": 1}] * (config.tensor_parallel_size - 1)
    group = placement_group(bundles, strategy="STRICT_PACK", name=f"forest-worker-{index}")
    strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=0,
                                                placement_group_capture_child_tasks=True)
    return {"num_cpus": 1, "num_gpus": 0, "scheduling_strategy": strategy}
