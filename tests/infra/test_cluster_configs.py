"""cluster/: Ray cluster-launcher configs against Ray's own schema; KubeRay manifests' shape."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]


def _load(name: str) -> dict[str, Any]:
    with open(CLUSTER / name) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def ray_schema() -> dict[str, Any]:
    import ray

    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- cluster launcher


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_matches_ray_schema(name: str, ray_schema: dict[str, Any]) -> None:
    import jsonschema

    jsonschema.validate(_load(name), ray_schema)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_ray_prepare_and_validate(name: str) -> None:
    """What `ray up` does before it talks to the cloud: fill defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_load(name)))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_node_types_and_scaling(name: str) -> None:
    cfg = _load(name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) > 0]
    cpu = [v for v in workers.values() if v["resources"].get("GPU", 0) == 0 and v["resources"].get("CPU", 0) > 0]
    assert len(gpu) == 1 and len(cpu) == 1, "one GPU worker type for training, one CPU type for data"
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"]
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]
    assert gpu[0]["max_workers"] * gpu[0]["resources"]["GPU"] >= 64, "must reach the 64-GPU scale"
    assert 0 < cfg["idle_timeout_minutes"] <= 60


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_installs_project_and_secures_dashboard(name: str) -> None:
    cfg = _load(name)
    mounts = cfg["file_mounts"]
    project_dir = next(remote for remote, local in mounts.items() if local in (".", "./"))
    setup = " && ".join(cfg["setup_commands"])
    assert f"pip install --no-cache-dir -e {project_dir}" in setup or f"pip install -e {project_dir}" in setup
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd
    assert any(remote.endswith(".ray/auth_token") for remote in mounts)
    assert cfg["docker"]["image"].startswith("rayproject/ray:2.60.")
    assert "py311" in cfg["docker"]["image"], "the project needs Python >= 3.11"
    # pyproject's package name and console script are what the docs tell users to run
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'name = "genpipe"' in pyproject and "pipeline = " in pyproject


# --------------------------------------------------------------------------- KubeRay


def _check_cluster_spec(spec: dict[str, Any], where: str) -> None:
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling must be on"
    assert str(spec.get("rayVersion", "")).startswith("2.60"), f"{where}: rayVersion"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: token auth"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"{where}: head must not be exposed"
    assert head["template"]["spec"]["containers"], f"{where}: head container"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert len(groups) >= 2
    gpu_groups = []
    for name, g in groups.items():
        assert isinstance(g["rayStartParams"], dict), f"{where}/{name}: rayStartParams"
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], f"{where}/{name}: replicas"
        assert g["maxReplicas"] >= 1
        containers = g["template"]["spec"]["containers"]
        limits = containers[0]["resources"]["limits"]
        if "nvidia.com/gpu" in limits:
            gpu_groups.append(g)
    assert len(gpu_groups) == 1 and len(groups) - len(gpu_groups) >= 1, f"{where}: a GPU and a CPU group"


def test_kuberay_raycluster_manifest() -> None:
    doc = _load("kuberay-raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"], "RayCluster")


def test_kuberay_rayjob_manifest() -> None:
    doc = _load("kuberay-rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    _check_cluster_spec(spec["rayClusterSpec"], "RayJob.rayClusterSpec")

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["pipeline", "run"], spec["entrypoint"]
    job_file = ROOT / argv[2]
    assert job_file.is_file(), f"RayJob entrypoint names {argv[2]}, which is not in the repository"
    assert job_file.resolve().is_relative_to(ROOT / "jobs")


def test_kuberay_image_installs_project() -> None:
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60." in dockerfile and "py311" in dockerfile
    assert "pip install --no-cache-dir -e ." in dockerfile
    images = {
        c["image"] for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml") for c in _containers(_load(name))
    }
    assert images == {"genpipe:0.1.0"}


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]
