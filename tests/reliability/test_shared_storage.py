"""Storage other nodes cannot see: on a Ray cluster of several nodes (or one an autoscaler may grow) a job whose
data, checkpoints, latent cache or MLflow store is a path on the driver's disk is refused before any work,
naming each setting and what to change it to; a path under a declared shared mount (`ray.shared_mounts`) or a
URI passes. The rule (`storage_problems`) is pure; the last test runs it against a real 2-node Ray cluster
through the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import SpecError, parse_spec
from pipeline.data.storage import local_path
from pipeline.stages import LATENT_ROOT, storage_problems
from tests.reliability.helpers import TINY_JOB, auth_disabled, clean_env, run_pipeline, write_job

LOCAL = {"data_dir": "data/digits", "storage": ".pipeline/ray", "tracking_uri": "sqlite:///mlflow.db",
         "latent_cache": ".pipeline/latents"}
REMOTE = {"data_dir": "s3://bucket/shards", "storage": "gs://bucket/ray", "tracking_uri": "http://mlflow:5000",
          "latent_cache": None}


def problems(nodes: int = 2, autoscaler: bool = False, mounts: tuple[str, ...] = (), cwd: str = "/home/me/work",
             **settings: str | None) -> list[str]:
    return storage_problems(nodes, autoscaler, **{**REMOTE, **settings}, shared_mounts=list(mounts), cwd=cwd)


# ----------------------------------------------------------------------------- the rule


def test_one_fixed_node_is_never_refused() -> None:
    assert problems(nodes=1, **LOCAL) == []


@pytest.mark.parametrize("nodes, autoscaler", [(2, False), (5, True), (1, True)])
def test_every_local_setting_is_one_problem_on_a_cluster(nodes: int, autoscaler: bool) -> None:
    found = problems(nodes, autoscaler, **LOCAL)
    assert len(found) == 4
    data, storage, store, latents = found
    assert data.startswith("data.dir: data/digits (/home/me/work/data/digits) is on this node's disk")
    assert "set data.dir to a bucket (s3://BUCKET/shards" in data
    assert storage.startswith("ray.storage: .pipeline/ray (/home/me/work/.pipeline/ray) is on this node's disk")
    assert "set ray.storage to a bucket (s3://BUCKET/ray" in storage
    assert store.startswith("tracking.uri / $MLFLOW_TRACKING_URI: sqlite:///mlflow.db is an embedded MLflow store "
                            "on this node's disk (/home/me/work/mlflow.db)")
    assert "mlflow server --artifacts-destination s3://BUCKET/mlflow" in store
    assert latents.startswith("ray.latent_cache: .pipeline/latents (/home/me/work/.pipeline/latents), where the "
                              "encode stage writes")
    assert "set ray.latent_cache to a bucket (s3://BUCKET/latents) or to a directory on a shared mount" in latents


@pytest.mark.parametrize("setting, value", [
    ("data_dir", "/data/shards"), ("data_dir", "file:///data/shards"), ("storage", "/scratch/ray"),
    ("storage", "file:/scratch/ray"), ("tracking_uri", "sqlite:////srv/mlflow.db"), ("tracking_uri", "file:./mlruns"),
    ("tracking_uri", "mlruns"), ("latent_cache", ".pipeline/latents"), ("latent_cache", "/scratch/latents")])
def test_each_local_setting_alone_is_refused(setting: str, value: str) -> None:
    found = problems(**{setting: value})
    assert len(found) == 1, found
    key = {"data_dir": "data.dir", "storage": "ray.storage", "tracking_uri": "tracking.uri",
           "latent_cache": "ray.latent_cache"}[setting]
    assert found[0].startswith(key)
    if value.startswith("/"):
        assert found[0].startswith(f"{key}: {value}") and f"({value})" not in found[0]  # absolute: shown once


@pytest.mark.parametrize("setting, value", [
    ("data_dir", "s3://bucket/shards"), ("data_dir", "gs://bucket/shards"), ("data_dir", "abfss://c@acct/shards"),
    ("storage", "s3://bucket/ray"), ("tracking_uri", "https://user:secret@mlflow.example.com"),
    ("tracking_uri", "postgresql://mlflow@db:5432/mlflow"), ("tracking_uri", "databricks"), ("latent_cache", None),
    ("latent_cache", "s3://bucket/latents")])
def test_uris_and_servers_pass(setting: str, value: str | None) -> None:
    assert problems(autoscaler=True, **{setting: value}) == []


def test_a_path_under_a_shared_mount_passes() -> None:
    mounts = ("/mnt/efs/", "/shared")
    assert problems(mounts=mounts, data_dir="/mnt/efs/shards", storage="/shared/ray",
                    tracking_uri="sqlite:////mnt/efs/mlflow.db", latent_cache="file:///mnt/efs/latents") == []
    assert problems(mounts=mounts, data_dir="/mnt/efs") == []  # the mount itself
    # relative paths are taken from the working directory: on the mount, they are shared too
    assert problems(mounts=mounts, cwd="/mnt/efs/work", **LOCAL) == []


@pytest.mark.parametrize("path", ["/mnt/efs2/shards", "/mnt/efs-old/shards", "/mnt/ef", "/mnt/efs/../local/shards",
                                  "/mnt"])
def test_a_string_prefix_of_a_mount_is_not_under_it(path: str) -> None:
    found = problems(mounts=("/mnt/efs",), data_dir=path)
    assert len(found) == 1 and found[0].startswith(f"data.dir: {path} ")


def test_local_path() -> None:
    assert local_path("s3://b/x") is None and local_path("gs://b/x") is None and local_path("hdfs://nn:8020/x") is None
    assert local_path("file:///mnt/x") == "/mnt/x" and local_path("file:/mnt/x") == "/mnt/x"
    assert local_path("data/x") == "data/x" and local_path("/abs") == "/abs"


def test_shared_mounts_are_absolute_and_the_latent_cache_a_directory_or_a_uri() -> None:
    raw = yaml.safe_load(yaml.safe_dump(TINY_JOB))
    raw["data"] = {"source": "digits", "dir": "data/digits"}  # built on first use: no shards needed to parse
    assert parse_spec(raw).ray.shared_mounts == []
    assert parse_spec(raw).ray.latent_cache == LATENT_ROOT
    raw["ray"]["shared_mounts"] = ["/mnt/efs", "/shared"]
    assert parse_spec(raw).ray.shared_mounts == ["/mnt/efs", "/shared"]
    raw["ray"]["shared_mounts"] = ["mnt/efs"]
    with pytest.raises(SpecError, match=r"ray\.shared_mounts.*'mnt/efs' is not an absolute path"):
        parse_spec(raw)
    raw["ray"] = {"latent_cache": "/mnt/efs/latents"}
    assert parse_spec(raw).ray.latent_cache == "/mnt/efs/latents"
    raw["ray"] = {"latent_cache": "s3://bucket/latents"}
    assert parse_spec(raw).ray.latent_cache == "s3://bucket/latents"


# ----------------------------------------------------------------------------- a real 2-node cluster


@pytest.fixture()
def two_nodes():
    """A Ray cluster of a head and a second node on this machine (no autoscaler, no token auth)."""
    from ray.cluster_utils import Cluster

    with auth_disabled():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        try:
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            yield cluster
        finally:
            cluster.shutdown()


@pytest.mark.slow
def test_two_node_cluster_refuses_local_storage_before_any_work(tmp_path: Path, digits8: Path, two_nodes,
                                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    import ray

    from pipeline.config import ClusterError, load_spec
    from pipeline.stages import check_shared_storage, cluster_shape

    work = tmp_path / "work"
    work.mkdir()
    job = write_job(tmp_path / "job.yaml", digits8)
    env = clean_env(RAY_AUTH_MODE="disabled")
    address = f"--set=ray.address={two_nodes.address}"

    refused = run_pipeline(work, "run", str(job), address, env=env, timeout=300)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-3000:]
    err = refused.stderr
    assert "this Ray cluster has 2 nodes, and each node reads and writes the job's data" in err, err[-3000:]
    assert f"  data.dir: {digits8} is on this node's disk; set data.dir to a bucket" in err
    assert f"  ray.storage: .pipeline/ray ({work}/.pipeline/ray) is on this node's disk" in err
    assert f"  tracking.uri / $MLFLOW_TRACKING_URI: sqlite:///{work}/mlflow.db is an embedded MLflow store on " \
           f"this node's disk ({work}/mlflow.db)" in err
    assert "ray.latent_cache" not in err  # no encode stage
    assert "ray.shared_mounts (e.g. ray.shared_mounts: [/mnt/efs])" in err
    assert "Traceback" not in err
    # nothing ran: no MLflow store or run, no checkpoint storage
    assert not (work / "mlflow.db").exists() and not (work / "mlruns").exists()
    assert not (work / ".pipeline" / "ray").exists()

    # the same job with the (really shared) temp directory declared passes the check and goes on to the next
    # one, which refuses 4 CPU of workers on this 2-CPU cluster started by hand (no autoscaler to add any), so
    # no training starts here either
    shared = f"--set=ray.shared_mounts=[{tmp_path_factory.getbasetemp()}]"
    passed = run_pipeline(work, "run", str(job), address, shared, "--set=stages.classifier.scale.cpus_per_worker=2",
                          env=env, timeout=300)
    assert passed.returncode == 2, passed.stdout[-2000:] + passed.stderr[-3000:]
    assert "on this node's disk" not in passed.stderr
    assert "stage 'classifier' needs 4 CPU (scale.workers=2 × scale.cpus_per_worker=2) but the Ray cluster has at " \
           "most 2" in passed.stderr, passed.stderr[-3000:]

    # the wrapper itself against the live cluster
    ray.init(address=two_nodes.address, logging_level="ERROR", log_to_driver=False)
    try:
        assert cluster_shape() == (2, False)
        spec = load_spec(job, [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"ray.storage={tmp_path}/ray"])
        with pytest.raises(ClusterError) as refusal:
            check_shared_storage(spec)
        listed = [line.split(":")[0] for line in str(refusal.value).splitlines() if line.startswith("  ")]
        assert listed == ["  data.dir", "  ray.storage", "  tracking.uri / $MLFLOW_TRACKING_URI"]
        check_shared_storage(load_spec(job, [f"ray.shared_mounts=[{tmp_path_factory.getbasetemp()}]",
                                             f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                                             f"ray.storage={tmp_path}/ray"]))
    finally:
        ray.shutdown()
