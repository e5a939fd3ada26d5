"""Where GeneratorWorkers run: Ray actor options from the engine config and the cluster's resources.

One worker per GPU by default (``num_gpus=1``). A tensor-parallel worker gets a placement group with one
GPU bundle per shard, packed on one node (STRICT_PACK); the actor itself holds no GPU and vLLM's Ray executor
starts the shards inside the group. On the CPU build a worker takes ``cpus_per_worker`` CPUs.
"""

from __future__ import annotations

from cluster.config import EngineConfig

CPUS_PER_CPU_WORKER = 1.0


def worker_placement(config: EngineConfig, *, device: str, index: int) -> dict:
    """Ray ``.options(...)`` for worker ``index``."""
    if device == "cpu":
        return {"num_cpus": CPUS_PER_CPU_WORKER, "num_gpus": 0}
    if config.tensor_parallel_size == 1:
        return {"num_cpus": 1, "num_gpus": 1}
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundles = [{"GPU": 1, "CPU": 1}] + [{"GPU": 1}] * (config.tensor_parallel_size - 1)
    group = placement_group(bundles, strategy="STRICT_PACK", name=f"forest-worker-{index}")
    strategy = PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=0,
                                                placement_group_capture_child_tasks=True)
    return {"num_cpus": 1, "num_gpus": 0, "scheduling_strategy": strategy}
