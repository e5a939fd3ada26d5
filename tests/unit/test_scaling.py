"""Scaling without a cluster: ``auto`` counts from a cluster shape, worker and sink placement, the KubeRay
manifests."""

from pathlib import Path

import pytest
import yaml

from cluster.config import EngineConfig, load_config
from cluster.placement import GPUS_PER_MANAGER, ClusterShape, auto_tensor_parallel, resolve_auto, worker_placement

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
GIB = 2**30


@pytest.mark.parametrize("nodes, tp, workers", [((8, 8), 1, 16), ((8, 8), 4, 4), ((8, 6), 4, 3), ((3,), 2, 1)])
def test_auto_workers_never_split_a_tensor_parallel_group_across_nodes(nodes, tp, workers):
    config = load_config(None, workers="auto", **{"engine.device": "cuda", "engine.tensor_parallel_size": tp})
    assert resolve_auto(config, ClusterShape(nodes)).workers == workers


def test_auto_managers_follow_the_sizing_rule():
    config = load_config(None, workers="auto", **{"engine.device": "cuda", "build.managers": "auto"})
    big = resolve_auto(config, ClusterShape((8,) * 8))
    assert big.workers == 64 and big.build.managers == -(-64 // GPUS_PER_MANAGER)
    assert resolve_auto(config, ClusterShape((1,))).build.managers == 1


def test_auto_tensor_parallel_fits_the_weights_on_one_node():
    assert auto_tensor_parallel(15 * GIB, 80, 8) == 1  # a 7B model in bf16 on an 80 GiB GPU
    assert auto_tensor_parallel(140 * GIB, 80, 8) == 4  # 70B: 280 GiB with KV room -> 4 GPUs
    with pytest.raises(ValueError, match="largest node has 2"):
        auto_tensor_parallel(140 * GIB, 80, 2)


def test_explicit_counts_are_left_alone():
    config = load_config(None, workers=3, **{"build.managers": 2})
    assert resolve_auto(config, ClusterShape((8,))) is config


def test_bad_counts_name_the_field():
    with pytest.raises(Exception, match="workers"):
        load_config(None, workers="many")
    with pytest.raises(Exception, match="managers"):
        load_config(None, **{"build.managers": 0})


def _manifest(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    cluster = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
    specs = [("head", cluster["headGroupSpec"])]
    specs += [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [(name, group["template"]["spec"]["containers"][0]) for name, group in specs]


@pytest.mark.parametrize("name, kind", [("raycluster.yaml", "RayCluster"), ("rayjob-build.yaml", "RayJob"),
                                        ("rayservice.yaml", "RayService")])
def test_kuberay_manifests_have_what_forest_relies_on(name, kind):
    doc = _manifest(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    containers = _pod_specs(doc)
    images = {c["image"] for _, c in containers}
    assert len(images) == 1, "head and workers must run the same image (same Forest, same Ray)"
    head = dict(containers)["head"]
    ports = {p["containerPort"] for p in head["ports"]}
    assert {6379, 8265, 8080} <= ports  # GCS, dashboard/job API, Prometheus metrics
    assert head["resources"]["limits"].get("nvidia.com/gpu") in (None, "0")  # the head runs no engine
    gpu_groups = [c for group, c in containers if group != "head"]
    assert gpu_groups and all(int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1 for c in gpu_groups)
    for c in gpu_groups:  # requests equal limits, so Kubernetes gives the GPUs the pod asks for
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]


def test_rayjob_runs_the_build_entrypoint_with_a_config_that_exists():
    doc = _manifest("rayjob-build.yaml")
    words = doc["spec"]["entrypoint"].split()
    assert words[:3] == ["python", "-m", "deploy.build"]
    config = words[words.index("--config") + 1]
    assert (REPO / config).is_file()
    assert words[words.index("--output") + 1].startswith("s3://")  # outlives the job's cluster
    assert doc["spec"]["shutdownAfterJobFinishes"] is True


def test_rayservice_serves_the_forest_app_on_port_8000():
    doc = _manifest("rayservice.yaml")
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    app = serve["applications"][0]
    assert app["import_path"] == "deploy.serve:build_app"
    assert (REPO / app["args"]["config"]).is_file()
    load_config(REPO / app["args"]["config"])  # valid
    assert serve["http_options"]["port"] == 8000
    assert 8000 in {p["containerPort"] for p in dict(_pod_specs(doc))["head"]["ports"]}


def test_dockerfile_installs_the_gpu_extra_and_the_code():
    text = (K8S / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM rayproject/ray:" in text
    assert '".[gpu]"' in text and "[cpu]" not in text.replace("`cpu`", "")
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in (pattern.rstrip("*") for pattern in include):
        assert f"COPY --chown=ray:users {package} ./{package}" in text
    image = _manifest("raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    ray_version = _manifest("raycluster.yaml")["spec"]["rayVersion"]
    assert f"rayproject/ray:{ray_version}-" in text and image.endswith("-gpu")


def test_placement_per_device():
    assert worker_placement(EngineConfig(), device="cpu", index=0) == {"num_cpus": 1.0, "num_gpus": 0}
    assert worker_placement(EngineConfig(), device="cuda", index=0) == {"num_cpus": 1, "num_gpus": 1}
    assert EngineConfig(device="auto").resolved_device(cluster_gpus=0) == "cpu"
    assert EngineConfig(device="auto", tensor_parallel_size=2).resolved_device(cluster_gpus=1) == "cpu"
    assert EngineConfig(device="auto", tensor_parallel_size=2).resolved_device(cluster_gpus=8) == "cuda"


def test_managers_spread_over_the_nodes_without_reserving_cpus():
    from cluster.placement import manager_placement

    assert manager_placement() == {"num_cpus": 0, "scheduling_strategy": "SPREAD"}
