"""Placement on a local Ray cluster that declares 4 GPUs: distinct GPUs per worker, packed tensor-parallel groups,
and ``auto`` counts derived from the cluster. Probe actors stand where GeneratorWorkers would (no GPU exists)."""

from cluster.config import EngineConfig, load_config
from cluster.placement import ClusterShape, resolve_auto, worker_placement


class Probe:
    def where(self) -> tuple[list, str]:
        import ray
        return [str(g) for g in ray.get_gpu_ids()], ray.get_runtime_context().get_node_id()


def test_one_worker_per_gpu_gets_distinct_gpu_ids(ray_cluster):
    ray = ray_cluster
    engine = EngineConfig(model="unused", device="cuda")
    probe = ray.remote(Probe)
    actors = [probe.options(**worker_placement(engine, device="cuda", index=i)).remote() for i in range(4)]
    try:
        placed = ray.get([a.where.remote() for a in actors], timeout=60)
    finally:
        for actor in actors:
            ray.kill(actor)
    gpu_ids = [ids for ids, _ in placed]
    assert all(len(ids) == 1 for ids in gpu_ids)
    assert sorted(i for ids in gpu_ids for i in ids) == ["0", "1", "2", "3"]


def test_tensor_parallel_groups_are_packed_on_one_node_with_distinct_gpus(ray_cluster):
    ray = ray_cluster
    from ray.util.placement_group import placement_group_table, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    engine = EngineConfig(model="unused", device="cuda", tensor_parallel_size=2)
    groups = [worker_placement(engine, device="cuda", index=i)["scheduling_strategy"].placement_group
              for i in range(2)]
    try:
        ray.get([g.ready() for g in groups], timeout=60)
        shard = ray.remote(Probe)
        seen = []
        for group in groups:
            table = placement_group_table(group)
            assert table["strategy"] == "STRICT_PACK"
            assert len(set(table["bundles_to_node_id"].values())) == 1  # one node
            assert [b.get("GPU") for b in table["bundles"].values()] == [1, 1]
            shards = [shard.options(num_cpus=0, num_gpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=b)).remote() for b in range(2)]
            seen.append([ray.get(s.where.remote(), timeout=60)[0][0] for s in shards])
            for s in shards:
                ray.kill(s)
        flat = [g for ids in seen for g in ids]
        assert sorted(flat) == ["0", "1", "2", "3"]  # no GPU is shared between or within groups
    finally:
        for group in groups:
            remove_placement_group(group)


def test_auto_counts_come_from_the_cluster(ray_cluster):
    shape = ClusterShape.current()
    assert shape.gpus == 4
    gpu = load_config(None, workers="auto", **{"engine.device": "cuda", "build.managers": "auto"})
    resolved = resolve_auto(gpu)
    assert (resolved.workers, resolved.engine.tensor_parallel_size) == (4, 1)
    assert resolved.build.managers == 4  # GPUS_PER_MANAGER = 1: one manager per worker
    tp2 = resolve_auto(load_config(None, workers="auto", **{"engine.device": "cuda",
                                                             "engine.tensor_parallel_size": 2}))
    assert tp2.workers == 2
    cpu = resolve_auto(load_config(None, workers="auto", **{"engine.device": "cpu"}))
    assert cpu.workers == 1
