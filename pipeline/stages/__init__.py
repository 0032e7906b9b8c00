"""The stage chain of a job: each stage trains (or encodes), evaluates, registers, gates.

One MLflow parent run per pipeline invocation, one child run per stage. Downstream stages load
their inputs from the registry by alias (`models:/NAME@champion`) and record the exact version.
A stage whose champion was produced by the same spec and inputs is skipped; a stage interrupted
mid-way resumes from its last Ray Train checkpoint (same run name, same storage path).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from pipeline import progress, tracking
from pipeline.config import ClusterError, JobSpec, SamplingSpec, SpecError, flatten, user_error_root, user_message
from pipeline.data import DataError, build_dataset, load_split, manifest_sha256, read_manifest
from pipeline.data.shards import expected_chw
from pipeline.data.storage import local_path

log = logging.getLogger("pipeline")

LATENT_ROOT = ".pipeline/latents"  # the default of ray.latent_cache: where encode stages cache latents


@dataclass
class StageOutcome:
    """What one stage produced."""

    name: str
    status: str  # trained | skipped | encoded | cached
    version: str | None = None
    champion: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class JobContext:
    """Everything the stages share during one invocation."""

    spec: JobSpec
    spec_path: Path
    uri: str
    experiment_id: str
    parent_run_id: str
    storage: str
    data_dir: Path
    refs: dict[str, tracking.ModelRef] = field(default_factory=dict)  # stage -> version it produced/used
    latent_dirs: dict[str, Path] = field(default_factory=dict)  # encode stage -> latent shards
    outcomes: list[StageOutcome] = field(default_factory=list)
    last_checkpoint: Any = None  # Ray Train checkpoint of the latest fit (in the run's storage)
    force_promote: bool = False  # `pipeline run --force-promote`: a worse version inside its bounds takes champion
    source: dict[str, str] = field(default_factory=dict)  # MLflow's source/user/commit tags of every run


# ----------------------------------------------------------------------------- setup


def ensure_data(spec: JobSpec) -> Path:
    """The job's shards, built from the bundled source on first use. Shards in a bucket, without a manifest
    (img2dataset's) or to be resized are named by a manifest on this machine (`shards.open_dataset`)."""
    from pipeline.data import storage
    from pipeline.data.shards import MANIFEST, open_dataset

    data_dir = Path(spec.data.dir)
    if spec.data.source != "shards" and storage.file_size(storage.join(spec.data.dir, MANIFEST)) is not None:
        manifest = read_manifest(spec.data.dir)
        if manifest.source != spec.data.source:
            raise DataError(f"{storage.display(spec.data.dir)} holds shards of '{manifest.source}', but the spec's "
                            f"data.source is '{spec.data.source}'; point data.dir elsewhere or remove it")
        if not storage.is_uri(spec.data.dir):
            return data_dir
    if spec.data.source == "shards" or storage.is_uri(spec.data.dir):
        return open_dataset(spec.data.dir, image_size=spec.data.image_size, held_out=spec.data.held_out)
    log.info("building %s shards in %s", spec.data.source, data_dir)
    build_dataset(spec.data.source, data_dir, image_size=spec.data.image_size, held_out=spec.data.held_out,
                  shard_size=spec.data.shard_size, seed=spec.seed)
    return data_dir


def _connect_timeout() -> float:
    return float(os.environ.get("PIPELINE_CONNECT_TIMEOUT_S", "10"))


def check_ray_address(address: str, timeout_s: float | None = None) -> None:
    """Fail fast (within `timeout_s`, not a hang) when a Ray address is malformed or does not answer."""
    timeout_s = _connect_timeout() if timeout_s is None else timeout_s
    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise ClusterError(
            f"ray.address / $RAY_ADDRESS is '{address}', a dashboard URL; it takes the cluster's GCS address "
            "host:6379 (or a Ray Client address ray://host:10001). To submit through the dashboard use "
            f"`pipeline submit JOB --address {address}`")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"ray.address / $RAY_ADDRESS '{address}' is not host:port (e.g. 127.0.0.1:6379)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} ({type(exc).__name__}: {exc}; waited at most "
            f"{timeout_s:g} s); start it (`ray start --head --node-ip-address=127.0.0.1`), fix ray.address or "
            "$RAY_ADDRESS, or unset both to run Ray inside this process") from None


def _scales(spec: JobSpec):
    for name, stage in spec.stages.items():
        scale = getattr(stage, "scale", None)
        if scale is not None:
            yield name, scale


RAY_WORKING_DIR = ("runtime_resources", "working_dir_files")  # where Ray unpacks a submitted job's --working-dir


def embedded_store_path(uri: str) -> str | None:
    """The file path behind an embedded MLflow store (`sqlite:///PATH`, `file:PATH`, a bare path), as written
    (relative or absolute); None for a tracking server or a database server of its own."""
    if uri.startswith("sqlite:///"):
        return uri[len("sqlite:///"):]
    if uri.startswith("file:"):
        return uri[len("file:"):].removeprefix("//")
    if "://" not in uri and not uri.startswith("databricks"):  # a plain path: MLflow's file store
        return uri
    return None


def check_store_outlives_ray(spec: JobSpec) -> None:
    """A submitted job runs in Ray's temporary copy of its working directory, deleted when the cluster stops:
    an embedded MLflow store there would take every run and registered model with it."""
    cwd = Path.cwd().resolve()
    if not all(part in cwd.parts for part in RAY_WORKING_DIR):
        return
    uri = tracking.tracking_uri(spec.tracking.uri)
    path = embedded_store_path(uri)
    if path is None:  # a tracking server, or a database of its own
        return
    if Path(path).resolve().is_relative_to(cwd):
        raise ClusterError(
            f"this job runs in Ray's temporary copy of its working directory ({cwd}), which Ray deletes when the "
            f"cluster stops, and its MLflow store {tracking.redact(uri)} would live there: every run and registered "
            "model would be lost. Point MLFLOW_TRACKING_URI (or tracking.uri) at a tracking server, e.g. "
            "ray job submit --runtime-env-json '{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"http://HOST:5000\"}}' "
            "... (or at sqlite:////PATH/mlflow.db on storage that outlives the cluster)")


def storage_problems(nodes: int, autoscaler: bool, *, data_dir: str, storage: str, tracking_uri: str,
                     latent_cache: str | None, shared_mounts: Sequence[str], cwd: str) -> list[str]:
    """What in a job's storage settings only this node can see, on a cluster where other nodes read and write it.

    A cluster of one node that no autoscaler may grow gets []. Otherwise each of `data_dir`, `storage`
    (ray.storage), an embedded MLflow store behind `tracking_uri` and `latent_cache` (the encode stage's
    cache, None without one) that is a local path — relative ones taken from `cwd` — and not under one of
    `shared_mounts` (whole path components: /mnt/efs2 is not under /mnt/efs) is one problem: the setting,
    where it points, and what to change it to.
    """
    if nodes <= 1 and not autoscaler:
        return []
    mounts = [PurePosixPath(os.path.normpath(m)) for m in shared_mounts]

    def unshared(path: str | None) -> PurePosixPath | None:
        if path is None:
            return None
        full = PurePosixPath(os.path.normpath(os.path.join(cwd, path)))
        return None if any(full.is_relative_to(m) for m in mounts) else full

    def shown(value: str, path: PurePosixPath) -> str:
        return value if value == str(path) else f"{value} ({path})"

    problems = []
    if (path := unshared(local_path(data_dir))) is not None:
        problems.append(f"data.dir: {shown(data_dir, path)} is on this node's disk; set data.dir to a bucket "
                        "(s3://BUCKET/shards, gs://BUCKET/shards) or to a directory on a shared mount")
    if (path := unshared(local_path(storage))) is not None:
        problems.append(f"ray.storage: {shown(storage, path)} is on this node's disk, where workers on other nodes "
                        "cannot write their checkpoints; set ray.storage to a bucket (s3://BUCKET/ray, "
                        "gs://BUCKET/ray) or to a directory on a shared mount")
    if (path := unshared(embedded_store_path(tracking_uri))) is not None:
        problems.append(f"tracking.uri / $MLFLOW_TRACKING_URI: {tracking.redact(tracking_uri)} is an embedded "
                        f"MLflow store on this node's disk ({path}); point it at a tracking server whose artifacts "
                        "go to a bucket (tracking.uri: http://HOST:5000, the server started with "
                        "`mlflow server --artifacts-destination s3://BUCKET/mlflow`), or keep the store on a "
                        "shared mount")
    if latent_cache is not None and (path := unshared(local_path(latent_cache))) is not None:
        problems.append(f"ray.latent_cache: {shown(latent_cache, path)}, where the encode stage writes the latent "
                        "shards the next stages read, is on this node's disk; set ray.latent_cache to a bucket "
                        "(s3://BUCKET/latents) or to a directory on a shared mount")
    return problems


def cluster_shape() -> tuple[int, bool]:
    """The connected Ray cluster: (alive nodes, whether an autoscaler may add nodes to it).

    An autoscaler may add nodes when the limits it publishes allow more of some resource than the cluster has
    now, or, when it publishes none (Ray's v1 autoscaler), whenever it has a cluster config (`_has_autoscaler`);
    a cluster started by hand (`ray start`) has none.
    """
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()  # None unless the autoscaler publishes its limits
    except Exception:  # noqa: BLE001 - private API; judge by the autoscaler's status alone
        most = None
    if most is None:
        return nodes, _has_autoscaler()
    now = ray.cluster_resources()
    return nodes, any(amount > now.get(res, 0.0) for res, amount in most.items())


def check_shared_storage(spec: JobSpec) -> None:
    """On a Ray cluster of several nodes (or one an autoscaler may grow), refuse storage settings that name
    paths only this node can see: `storage_problems` of the spec against the connected cluster."""
    nodes, autoscaler = cluster_shape()
    encodes = any(stage.kind == "encode" for stage in spec.stages.values())
    problems = storage_problems(
        nodes, autoscaler, data_dir=spec.data.dir, storage=spec.ray.storage,
        tracking_uri=tracking.tracking_uri(spec.tracking.uri), latent_cache=spec.ray.latent_cache if encodes else None,
        shared_mounts=spec.ray.shared_mounts, cwd=str(Path.cwd().resolve()))
    if not problems:
        return
    shape = f"{nodes} nodes" if nodes > 1 else "1 node"
    if autoscaler:
        shape += " and an autoscaler that may add more"
    raise ClusterError(
        f"this Ray cluster has {shape}, and each node reads and writes the job's data, checkpoints and runs "
        "itself, but these settings name paths on this node's disk only:\n"
        + "".join(f"  {p}\n" for p in problems)
        + "A directory every node mounts at the same path (NFS, EFS, Filestore) is fine once listed in "
        "ray.shared_mounts (e.g. ray.shared_mounts: [/mnt/efs])")


def preflight(spec: JobSpec) -> None:
    """Checks that start nothing and write nothing: the MLflow store outlives Ray; the Ray address answers; GPUs
    exist where asked for."""
    check_store_outlives_ray(spec)
    address = spec.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_ray_address(address)
        return
    for name, scale in _scales(spec):
        if scale.gpus_per_worker > 0 and not torch.cuda.is_available():
            raise ClusterError(
                f"stage '{name}': scale.gpus_per_worker={scale.gpus_per_worker:g}, but this machine has no GPU "
                "that torch can use (torch.cuda.is_available() is False); set "
                f"stages.{name}.scale.gpus_per_worker=0 to train on CPU, or point ray.address at a cluster "
                "with GPU nodes")


def _has_autoscaler() -> bool:
    """True when an autoscaler with a cluster config (node types it may launch) monitors this cluster.

    Every head runs the monitor and writes its status into the GCS; on a cluster started by hand (`ray start`)
    the monitor only mirrors the nodes it sees, under anonymous node types `node_<id>` (Ray's readonly
    provider), while the cluster launcher, KubeRay and the fake multi-node provider report their configured types.
    """
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.autoscaler._private.util import format_readonly_node_type
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        if not raw:
            return False
        report = json.loads(raw).get("autoscaler_report") or {}
        types = set(report.get("active_nodes") or {}) | set((report.get("node_type_mapping") or {}).values())
        anonymous = format_readonly_node_type("")
        return any(not t.startswith(anonymous) for t in types)
    except Exception:  # noqa: BLE001 - private API; assume a fixed-size cluster
        return False


def check_resources(spec: JobSpec) -> None:
    """Every trained stage fits the cluster (or what its autoscaler may add); otherwise Ray Train waits forever."""
    import ray

    now = ray.cluster_resources()
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()  # None without an autoscaler
    except Exception:  # noqa: BLE001 - private API; fall back to what the cluster has now
        most = None
    where = "the autoscaler's cluster config allows" if most else "the Ray cluster has"
    clustered = bool(spec.ray.address or os.environ.get("RAY_ADDRESS"))
    if most is None and clustered and _has_autoscaler():  # an autoscaler that does not publish its limits
        return
    for name, scale in _scales(spec):
        need = {"CPU": scale.workers * scale.cpus_per_worker, "GPU": scale.workers * scale.gpus_per_worker}
        for res, amount in need.items():
            have = max(now.get(res, 0.0), (most or {}).get(res, 0.0))
            if amount > have:
                per = "cpus_per_worker" if res == "CPU" else "gpus_per_worker"
                raise ClusterError(
                    f"stage '{name}' needs {amount:g} {res} (scale.workers={scale.workers} × scale.{per}="
                    f"{getattr(scale, per):g}) but {where} at most {have:g}; lower stages.{name}.scale.workers or "
                    f"stages.{name}.scale.{per}, or add nodes")
        have = max(now.get("CPU", 0.0), (most or {}).get("CPU", 0.0))
        if need["CPU"] >= have:  # the workers' Ray Data tasks (read, decode) would never get a CPU
            raise ClusterError(
                f"stage '{name}' takes all {have:g} CPU of the cluster for its workers (scale.workers={scale.workers}"
                f" × scale.cpus_per_worker={scale.cpus_per_worker:g}), leaving none for the Ray Data tasks that "
                f"read its shards; lower stages.{name}.scale.cpus_per_worker (fractions work) or "
                f"stages.{name}.scale.workers, raise ray.num_cpus (in-process Ray), or add nodes")


def init_ray(spec: JobSpec) -> None:
    """Connect to the cluster named by the spec or $RAY_ADDRESS, or start Ray in-process. A cluster of several
    nodes (or an autoscaling one) is refused, before any work, when the job's storage is on this node's disk only
    (`check_shared_storage`)."""
    import ray

    if ray.is_initialized():
        return
    env = {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda"),
           "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        if key in os.environ:
            env[key] = os.environ[key]
    address = spec.ray.address or os.environ.get("RAY_ADDRESS")
    if address:  # a cluster (or `ray job submit`): the job's own runtime env reaches the workers
        check_ray_address(address)
        ray.init(address=address, log_to_driver=True)
        check_shared_storage(spec)
    else:  # in-process: no dashboard / job API at all
        # one machine, no node to be preempted: Train's preemption watcher would only be one more process
        # starting beside the workers (0.6-1 s of fit() -> first batch on 2 cores, BENCHMARKS.md)
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(address="local", num_cpus=spec.ray.num_cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": env,
                              "worker_process_setup_hook": "pipeline.train.ray_logging.quiet_worker_logs"},
                 logging_config=ray.LoggingConfig(log_level="WARNING"))
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.raise_original_map_exception = True  # a DataError raised in a map task reaches us as itself
    start_ray_data_stats_actor()


def start_ray_data_stats_actor() -> None:
    """Create Ray Data's detached stats actor now (without waiting for it), on the driver's node.

    Ray Data creates it on the node of whoever first runs a dataset: from a training worker on an
    autoscaled node that pins the node for ever (the autoscaler never removes a node with a live
    actor), so idle workers would not scale down; and in a fresh Ray instance the first training stage
    would wait for its process to start before its first batch (about 1 s on 2 cores, BENCHMARKS.md).
    """
    try:
        from ray.data._internal.stats import get_or_create_stats_actor

        get_or_create_stats_actor()
    except Exception as exc:  # noqa: BLE001 - private API; only scale-down suffers without it
        log.debug("could not pre-create Ray Data's stats actor: %s", exc)


def stage_key(ctx: JobContext, name: str, inputs: dict[str, str]) -> str:
    """What a stage's result depends on (its spec, its input versions, the data), hashed: equal keys skip."""
    payload = {"stage": ctx.spec.stage_hash(name), "inputs": inputs,
               "data": manifest_sha256(ctx.data_dir)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def input_refs(ctx: JobContext, name: str) -> dict[str, tracking.ModelRef]:
    """The registered version each needed stage's champion points to now."""
    refs: dict[str, tracking.ModelRef] = {}
    for need in ctx.spec.stages[name].needs:
        stage = ctx.spec.stages[need]
        if stage.kind == "encode":
            refs.update(input_refs(ctx, need))
            continue
        refs[need] = tracking.resolve(f"models:/{stage.registry.name}@champion")
    return refs


# ----------------------------------------------------------------------------- stages


def pixel_dataset(ctx: JobContext, data_dir: Path):
    """What a stage's workers stream: the training split of `data_dir` in the order of `pipeline.data.stream`,
    images augmented per the spec (never latents), fresh each epoch."""
    from pipeline.data.stream import spec_for

    aug = ctx.spec.data.augment
    pixel = data_dir == ctx.data_dir
    return spec_for(str(data_dir), "train", seed=ctx.spec.seed, window=ctx.spec.data.shuffle_shards,
                    on_corrupt=ctx.spec.data.on_corrupt, hflip=aug.hflip and pixel, shift=aug.shift if pixel else 0,
                    crop=ctx.spec.data.crop)


def _fit(ctx: JobContext, name: str, key: str, run_id: str, dataset, extra: dict[str, Any],
         suffix: str = "") -> Path:
    from pipeline.train.ray_worker import fit_stage

    stage = ctx.spec.stages[name]
    if dataset.size < stage.train.batch_size:
        raise DataError(f"the training split has {dataset.size} samples, fewer than one global batch of "
                        f"{stage.train.batch_size}; lower stages.{name}.train.batch_size")
    config = {"stage": stage.model_dump(mode="json"), "seed": ctx.spec.seed, "tracking_uri": ctx.uri,
              "run_id": run_id, "data": dataset, **extra}
    with progress.stage_progress(name, run_id, last_step(stage), start=extra.get("step_offset", 0)):
        result = fit_stage(config, run_name=f"{ctx.spec.name}-{name}-{key}{suffix}", storage_path=ctx.storage)
    if result.error:
        raise result.error
    ctx.last_checkpoint = result.checkpoint
    out = Path(tempfile.mkdtemp(prefix=f"pipeline-{name}-"))
    result.checkpoint.to_directory(str(out))
    export = out / "export"
    if not (export / "model.safetensors").is_file():
        raise RuntimeError(f"stage {name}: the final checkpoint holds no exported weights")
    return export


def _log_png(run_id: str, png: bytes, path: str) -> None:
    """A PNG as the run's artifact `path`, and as an MLflow image (key `path` less `.png`) at the run's last
    training step, which the UI shows with a step slider."""
    import io

    from mlflow.tracking import MlflowClient
    from PIL import Image

    client = MlflowClient()
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / Path(path).name
        p.write_bytes(png)
        client.log_artifact(run_id, str(p), str(Path(path).parent) if "/" in path else None)
    params = client.get_run(run_id).data.params
    step = int(params.get("train.steps", 0)) * int(params.get("halvings", 1))  # as last_step(stage)
    client.log_image(run_id, Image.open(io.BytesIO(png)), key=str(Path(path).with_suffix("")), step=step)


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log a stage's evaluation metrics to its MLflow run, at `step` (the stage's last training step)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for k, v in metrics.items():
        client.log_metric(run_id, k, float(v), step=step)


def last_step(stage: Any) -> int:
    """The last training step of a stage's curves in its run (a distillation's halvings follow each other)."""
    train = getattr(stage, "train", None)
    return train.steps * getattr(stage, "halvings", 1) if train is not None else 0


def run_autoencoder(ctx: JobContext, name: str, key: str, run_id: str, inputs) -> tuple[Path, dict]:
    """Train an autoencoder-family model; evaluate it on held-out data with its objective's evaluator."""
    from pipeline.objectives import get_objective
    from pipeline.train.export import load_exported

    stage = ctx.spec.stages[name]
    cfg = dict(stage.objective)
    objective = get_objective(cfg.get("type", "kl_vae"))  # an unknown type fails before training
    export = _fit(ctx, name, key, run_id, pixel_dataset(ctx, ctx.data_dir), {})
    model, _ = load_exported(export)
    model.eval()
    metrics, images = objective.evaluate(model, ctx.data_dir, cfg, ctx.spec.seed)
    for path, png in images.items():
        _log_png(run_id, png, path)
    return export, metrics


def run_classifier(ctx: JobContext, name: str, key: str, run_id: str, inputs) -> tuple[Path, dict]:
    """Train the image classifier; evaluate accuracy on held-out images."""
    from pipeline.eval import classify
    from pipeline.train.export import load_exported

    data_dir = data_dir_of(ctx, name)  # latents when it needs an encode stage (a noisy latent classifier)
    export = _fit(ctx, name, key, run_id, pixel_dataset(ctx, data_dir), {})
    model, _ = load_exported(export)
    test = load_split(data_dir, "test", limit=ctx.spec.eval.held_out_samples)
    pred = classify(model, torch.from_numpy(test["image"]))
    acc = float((pred.numpy() == test["label"]).mean())
    return export, {"eval/accuracy": acc}


def _eval_generator(ctx: JobContext, run_id: str, model_dir: Path, *, steps, guidance: float,
                    num_samples: int, prefix: str, sampler: str = "ddim", classifier_guide: str | None = None,
                    classifier_scale: float = 0.0, sampling: SamplingSpec | None = None) -> dict[str, float]:
    """Sample class-conditionally, log a grid, and measure against held-out data.

    With `classifier_guide` (a noisy classifier stage or models:/ URI) and `classifier_scale`, samples are
    drawn with classifier guidance (eq. 36-38) on top of classifier-free guidance `guidance`. `sampling` (the
    stage's spec) brings the sampler's own settings: DDIM's η, Langevin's steps per level and step ratio.
    """
    from pipeline.eval import generate, image_grid, sample_metrics

    gen = load_generator(model_dir)
    classifier = _classifier(ctx)
    n_cls = gen.num_classes
    labels = torch.arange(num_samples) % n_cls
    guide = {}
    if sampling is not None:
        guide = {"eta": sampling.eta, "langevin_steps": sampling.langevin_steps,
                 "langevin_step_ratio": sampling.langevin_step_ratio}
    if classifier_guide and classifier_scale:
        guide |= {"cond_fn": guidance_cond_fn(ctx, classifier_guide, gen), "classifier_scale": classifier_scale}
    t0 = time.perf_counter()
    fake = generate(gen, labels, steps=steps, guidance=guidance, sampler=sampler, seed=ctx.spec.seed, **guide)
    secs = time.perf_counter() - t0
    grid_labels = torch.arange(n_cls).repeat_interleave(8)
    grid = generate(gen, grid_labels, steps=steps, guidance=guidance, sampler=sampler, seed=ctx.spec.seed + 1,
                    **guide)
    _log_png(run_id, image_grid(grid, nrow=8, scale=4), f"samples/{prefix}grid.png")
    metrics = {"samples_per_sec": num_samples / secs}
    if classifier is not None:
        real = torch.from_numpy(load_split(ctx.data_dir, "test", limit=ctx.spec.eval.held_out_samples)["image"])
        metrics.update(sample_metrics(fake, labels, real, classifier))
    return {f"eval/{prefix}{k}": v for k, v in metrics.items()}


def guidance_cond_fn(ctx: JobContext | None, classifier: str, gen):
    """`cond_fn` of classifier guidance from a noisy classifier: a stage of this job or a models:/ URI."""
    from pipeline.eval.guidance import GuidanceError, registered_cond_fn

    ref = ctx.refs[classifier] if ctx is not None and classifier in ctx.refs else tracking.resolve(classifier)
    try:
        return registered_cond_fn(ref, gen)
    except GuidanceError as exc:
        raise SpecError(f"sampling.classifier '{classifier}' ({ref.name} v{ref.version}) cannot guide: {exc}") from None


def _classifier(ctx: JobContext):
    from pipeline.train.export import load_exported

    name = ctx.spec.eval.classifier
    if not name or name not in ctx.refs:
        return None
    model, _ = load_exported(tracking.download(ctx.refs[name]))
    return model


def load_generator(model_dir: str | Path):
    """A diffusion model with its decoder (the autoencoder it was trained on, from the registry)."""
    from pipeline.eval import Generator
    from pipeline.train.export import load_exported

    model, meta = load_exported(model_dir)
    decoder = None
    ae_uri = meta["extra"].get("autoencoder")
    bundled = Path(model_dir) / "decoder"  # a registered version carries its autoencoder (tracking.pyfunc)
    if (bundled / "model.json").is_file():
        decoder, _ = load_exported(bundled)
    elif ae_uri:
        decoder, _ = load_exported(tracking.download(tracking.resolve(ae_uri)))
    return Generator(model, meta, decoder)


def run_diffusion(ctx: JobContext, name: str, key: str, run_id: str, inputs) -> tuple[Path, dict]:
    """Train DDPM on the latents (or pixels) of its input; evaluate samples."""
    stage = ctx.spec.stages[name]
    encode = next((n for n in stage.needs if ctx.spec.stages[n].kind == "encode"), None)
    if encode:
        from pipeline.stages.encode import latent_info

        data_dir = ctx.latent_dirs[encode]
        info = latent_info(data_dir)
        data_info = {"latent_scale": info["latent_scale"], "autoencoder": info["autoencoder"]}
    else:
        data_dir, data_info = ctx.data_dir, {"latent_scale": 1.0}
    manifest = read_manifest(data_dir)
    h, w, c = manifest.image_size
    data_info["sample_shape"] = [c, h, w]
    if stage.conditioning == "text":  # captions through a text encoder: pipeline.train.text_task
        from pipeline.train.text_task import run_text_diffusion

        return run_text_diffusion(ctx, name, key, run_id, data_dir, manifest.num_classes, data_info)
    export = _fit(ctx, name, key, run_id, pixel_dataset(ctx, data_dir),
                  {"num_classes": manifest.num_classes, "data_info": data_info})
    s = stage.sampling
    metrics = _eval_generator(ctx, run_id, export, steps=s.steps, guidance=s.guidance,
                              num_samples=min(s.num_samples, ctx.spec.eval.num_samples), prefix="",
                              sampler=s.sampler, classifier_guide=s.classifier, classifier_scale=s.classifier_scale,
                              sampling=s)
    return export, metrics


def run_distill(ctx: JobContext, name: str, key: str, run_id: str, inputs) -> tuple[Path, dict]:
    """Progressive distillation: `halvings` rounds, each student becoming the next teacher."""
    from pipeline.diffusion.schedule import strided_timesteps
    from pipeline.train.export import read_meta

    stage = ctx.spec.stages[name]
    (teacher_stage, teacher_ref), = inputs.items()
    teacher_dir = Path(tracking.download(teacher_ref))
    meta = read_meta(teacher_dir)
    T = int(meta["extra"]["diffusion"].get("timesteps", 1000))
    timesteps = strided_timesteps(T, stage.teacher_steps)
    teacher_data_dir = data_dir_of(ctx, teacher_stage)
    metrics: dict[str, float] = {}
    s = stage.sampling
    n = min(s.num_samples, ctx.spec.eval.num_samples)
    teacher_guidance = stage.guidance
    metrics.update(_eval_generator(ctx, run_id, teacher_dir, steps=timesteps, guidance=teacher_guidance,
                                   num_samples=n, prefix=f"teacher_{len(timesteps)}steps_"))
    # Workers fetch the teacher themselves (they may sit on other nodes): first from the
    # registry's artifact store, then each student from its Ray Train checkpoint in storage.
    teacher_input: dict[str, Any] = {"uri": teacher_ref.source}
    for h in range(stage.halvings):
        log.info("[%s] halving %d/%d: %d → %d steps", name, h + 1, stage.halvings, len(timesteps),
                 len(timesteps) // 2)
        teacher_dir = _fit(ctx, name, key, run_id, pixel_dataset(ctx, teacher_data_dir),
                           {"inputs": {"teacher": teacher_input}, "teacher_timesteps": timesteps,
                            "step_offset": h * stage.train.steps},
                           suffix=f"-h{h + 1}")
        timesteps = sorted(timesteps)[1::2]
        teacher_input = {"checkpoint": ctx.last_checkpoint}
        metrics.update(_eval_generator(ctx, run_id, teacher_dir, steps=timesteps, guidance=0.0,
                                       num_samples=n, prefix=f"student_{len(timesteps)}steps_"))
    # The final student's numbers under the stable names the gate reads (once: no duplicate keys)
    final = f"student_{len(timesteps)}steps_"
    return teacher_dir, {k.replace(final, ""): v for k, v in metrics.items()}


def data_dir_of(ctx: JobContext, stage_name: str) -> Path:
    """The shard directory a stage trains on: the job's data, or the latents of the encode stage it needs."""
    stage = ctx.spec.stages[stage_name]
    for need in stage.needs:
        if need in ctx.latent_dirs:
            return ctx.latent_dirs[need]
    return ctx.data_dir


RUNNERS = {"autoencoder": run_autoencoder, "classifier": run_classifier, "diffusion": run_diffusion,
           "distill": run_distill}

# The runners of the other stage kinds live in their own modules (they import this one's helpers).
from pipeline.stages.consistency import run_consistency  # noqa: E402
from pipeline.stages.controlnet import run_controlnet  # noqa: E402
from pipeline.stages.encode import run_encode  # noqa: E402
from pipeline.stages.prior import run_prior  # noqa: E402
from pipeline.stages.superres import run_superres  # noqa: E402

RUNNERS.update(superres=run_superres, controlnet=run_controlnet, consistency=run_consistency, prior=run_prior)
from pipeline.stages.unclip import unclip_runners  # noqa: E402

RUNNERS.update(unclip_runners())  # clip, clip_prior, unclip_decoder (notes 2.6.2, eq. 49)

#: What a registered version of each stage kind is (its description in the registry), and whether
#: `pipeline sample` draws from it.
WHAT = {"autoencoder": ("an autoencoder-family model", False), "classifier": ("an image classifier", False),
        "diffusion": ("a diffusion model", True), "distill": ("a progressively distilled diffusion student", True),
        "superres": ("a stage of a diffusion cascade", True),
        "controlnet": ("a ControlNet over a diffusion model", True),
        "consistency": ("a consistency model", True), "prior": ("a PixelCNN prior over VQ codes", False),
        "clip": ("a CLIP image and text encoder pair", False), "clip_prior": ("an unCLIP prior", False),
        "unclip_decoder": ("an unCLIP decoder", True)}


# ----------------------------------------------------------------------------- driver


def run_job(spec: JobSpec, spec_path: str | Path, *, force_promote: bool = False) -> list[StageOutcome]:
    """Run every stage of `spec` in order; returns what each stage did.

    `force_promote` lets a stage's new version take `champion` even when worse than the current one
    (never outside its gate's bounds); see `promote_stage`.
    """
    from mlflow.tracking import MlflowClient

    uri = tracking.tracking_uri(spec.tracking.uri)
    tracking.connect(uri)
    preflight(spec)  # before anything is written: shards, MLflow store, Ray session
    progress.start_pending_log()  # from here on Ray's and DeepSpeed's output goes to the run's log file
    if spec.ray.address or os.environ.get("RAY_ADDRESS"):
        init_ray(spec)  # a cluster: its nodes must be able to see the data before any is built
    data_dir = ensure_data(spec)
    init_ray(spec)
    check_resources(spec)
    experiment_id = tracking.training_experiment(spec.tracking.experiment or spec.name)
    client = MlflowClient()
    source = tracking.source_tags(f"pipeline run {spec_path}")
    parent = client.create_run(experiment_id, run_name=f"{spec.name}",
                               tags={"pipeline.job": spec.name, "pipeline.spec_path": str(spec_path),
                                     "pipeline.code_version": tracking.code_version(), **source})
    ctx = JobContext(spec=spec, spec_path=Path(spec_path), uri=uri, experiment_id=experiment_id,
                     parent_run_id=parent.info.run_id, storage=spec.ray.storage, data_dir=data_dir,
                     force_promote=force_promote, source=source)
    _log_spec_artifact(parent.info.run_id, Path(spec_path))
    job = {k: v for k, v in spec.model_dump(mode="json").items() if k != "stages"}  # each stage's are on its run
    tracking.log_params_flat(parent.info.run_id, {**redacted_params(job), "stages": ", ".join(spec.stages)})
    status = "FAILED"
    try:
        for name in spec.stages:
            ctx.outcomes.append(run_stage(ctx, name))
            _log_headline(ctx, ctx.outcomes[-1])
        status = "FINISHED"
    finally:
        client.set_terminated(parent.info.run_id, status)
    return ctx.outcomes


def _log_headline(ctx: JobContext, outcome: StageOutcome) -> None:
    """A trained stage's gate metric on the job's parent run, as `<stage>/<metric>`."""
    stage = ctx.spec.stages[outcome.name]
    metric = stage.registry.gate.metric if hasattr(stage, "registry") else None
    if outcome.status == "trained" and metric in outcome.metrics:
        log_metrics(ctx.parent_run_id, {f"{outcome.name}/{metric}": outcome.metrics[metric]})


def _data_read_by(ctx: JobContext, name: str) -> Path:
    """The shards a stage reads: `data_dir_of`, or for a stage on a trained model (distillation, consistency
    distillation) the shards that model was trained on."""
    stage = ctx.spec.stages[name]
    for need in stage.needs:
        if need in ctx.latent_dirs:
            return ctx.latent_dirs[need]
    for need in stage.needs:
        directory = _data_read_by(ctx, need)
        if directory != ctx.data_dir:
            return directory
    return ctx.data_dir


def _log_data(ctx: JobContext, name: str, run_id: str) -> None:
    """The splits a stage reads, as MLflow dataset inputs of its run (digest, split, sample count)."""
    directory = _data_read_by(ctx, name)
    manifest = read_manifest(directory)
    digest = manifest_sha256(directory)
    for split, context in (("train", "train"), ("test", "eval")):
        if split in manifest.splits:
            source = tracking.redact(manifest.root or str(Path(directory).resolve()))  # where the shards are
            tracking.log_dataset(run_id, source, name=f"{manifest.source}:{split}",
                                 digest=digest, split=split, num_samples=manifest.splits[split].num_samples,
                                 context=context)


def redacted_params(spec: dict[str, Any]) -> dict[str, Any]:
    """Flattened spec for MLflow params, with any password in a URI value replaced by ***."""
    return {k: tracking.redact(v) if isinstance(v, str) else v for k, v in flatten(spec).items()}


def _log_spec_artifact(run_id: str, spec_path: Path) -> None:
    """Log the job file as artifact `spec/<name>`, with any password in a URI replaced by ***."""
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory(prefix="pipeline-spec-") as d:
        copy = Path(d) / spec_path.name
        copy.write_text(tracking.redact(spec_path.read_text()))
        MlflowClient().log_artifact(run_id, str(copy), "spec")


def _stage_user_error(ctx: JobContext, name: str, exc: Exception) -> Exception:
    """A stage's failure as the user error behind it (named after the stage, with what to do), or `exc`."""
    from pipeline.data import DataError
    from pipeline.train.loop import NonFiniteLoss

    root = user_error_root(exc, (SpecError, DataError, ClusterError, tracking.TrackingError, NonFiniteLoss))
    if root is None:
        return exc
    msg = user_message(root)
    if isinstance(root, DataError) and ctx.spec.data.on_corrupt == "fail" and (
            "corrupt member" in msg or "image shape" in msg or "has no" in msg):
        msg += (" — set data.on_corrupt=skip to skip and count such samples, or rebuild the shards "
                "(`pipeline data build`)")
    try:
        return type(root)(f"stage '{name}': {msg}")
    except TypeError:  # an exception type that takes other arguments
        return ClusterError(f"stage '{name}': {msg}")


def _describe(ctx: JobContext, name: str, ref: tracking.ModelRef, inputs: dict[str, tracking.ModelRef],
              promotion: tracking.Promotion) -> None:
    """Write the registry descriptions of the stage's new version and of its registered model."""
    what, sampled = WHAT.get(ctx.spec.stages[name].kind, ("a model", False))
    classifier = ctx.spec.eval.classifier
    evaluator = ctx.refs.get(classifier) if sampled and classifier else None  # class accuracy, FID, KID
    text = tracking.describe_version(ref, what=what, job=ctx.spec.name, stage=name, inputs=inputs,
                                     promotion=promotion, evaluator=evaluator, sampled=sampled)
    model_text = (f"{what[0].upper()}{what[1:]} trained by stage `{name}` of job `{ctx.spec.name}`; `champion` is "
                  "the latest version that passed its gate without regressing.")
    tracking.set_descriptions(ref, text, "\n\n".join([model_text, "\n".join(
        tracking.usage(f"models:/{ref.name}@champion", sampled))]))


def promote_stage(ctx: JobContext, name: str, ref: tracking.ModelRef,
                  inputs: dict[str, tracking.ModelRef]) -> tracking.Promotion:
    """Move `champion` to the stage's new version `ref` by the rule of `pipeline promote` (`tracking.judge`).

    The version must pass the stage's gate and not be worse than the current champion on the gate
    metric (`ctx.force_promote` skips that comparison, not the bounds). Sets `ctx.refs[name]` to the
    version the next stages use: `ref`, or the earlier champion; raises when there is none.
    """
    g = ctx.spec.stages[name].registry.gate
    r = tracking.promote(ref.name, "champion", ref.version, force=ctx.force_promote,
                         gate=tracking.Gate.from_bounds(g.metric, g.min, g.max))
    _describe(ctx, name, ref, inputs, r)
    if r.promoted:
        ctx.refs[name] = ref
        if r.forced:
            log.warning("[%s] %s v%s → champion: %s", name, ref.name, ref.version, r.reason)
        return r
    if r.previous is None:
        raise RuntimeError(f"stage {name}: {ref.name} v{ref.version} failed its gate ({r.reason}) and there is "
                           "no earlier champion for the next stages to use")
    log.warning("[%s] %s v%s not promoted: %s; champion stays v%s", name, ref.name, ref.version, r.reason,
                r.previous.version)
    ctx.refs[name] = r.previous
    return r


def run_stage(ctx: JobContext, name: str) -> StageOutcome:
    """Run one stage: skip it when its champion has the same key, else train, evaluate, register and gate."""
    from mlflow.tracking import MlflowClient

    spec, stage = ctx.spec, ctx.spec.stages[name]
    client = MlflowClient()
    t0 = time.perf_counter()
    inputs = input_refs(ctx, name)
    if stage.kind == "encode":
        log.info("[%s] encoding with %s", name, ", ".join(f"{r.name} v{r.version}" for r in inputs.values()))
        outcome = run_encode(ctx, name, inputs)
        outcome.seconds = time.perf_counter() - t0
        return outcome
    key = stage_key(ctx, name, {k: v.uri for k, v in inputs.items()})
    champion = tracking.find_alias(stage.registry.name, "champion")
    if champion and champion.tags.get("pipeline.stage_key") == key:
        log.info("[%s] skipped: champion %s v%s was produced by this spec and these inputs",
                 name, champion.name, champion.version)
        ctx.refs[name] = champion
        return StageOutcome(name, "skipped", champion.version, True, seconds=time.perf_counter() - t0)
    log.info("[%s] training (%s) — inputs: %s", name, stage.kind,
             ", ".join(f"{r.name} v{r.version}" for r in inputs.values()) or "data only")
    run = client.create_run(ctx.experiment_id, run_name=name,
                            tags={"mlflow.parentRunId": ctx.parent_run_id, "pipeline.stage": name,
                                  "pipeline.stage_key": key, **ctx.source})
    run_id = run.info.run_id
    status = "FAILED"
    try:
        tracking.log_params_flat(run_id, redacted_params(stage.model_dump(mode="json")))
        _log_data(ctx, name, run_id)
        _log_spec_artifact(run_id, ctx.spec_path)
        for role, ref in inputs.items():
            client.set_tag(run_id, f"pipeline.input.{role}", ref.uri)
        try:
            with tracking.system_metrics(run_id):
                export, metrics = RUNNERS[stage.kind](ctx, name, key, run_id, inputs)
        except Exception as exc:
            raise _stage_user_error(ctx, name, exc) from None
        log_metrics(run_id, metrics, step=last_step(stage))
        tags = {"pipeline.stage_key": key, "pipeline.spec_sha256": spec.stage_hash(name),
                "pipeline.data_manifest_sha256": manifest_sha256(ctx.data_dir),
                "pipeline.code_version": tracking.code_version(), "pipeline.job": spec.name,
                **{f"pipeline.input.{k}": v.uri for k, v in inputs.items()}}
        ref = tracking.register(stage.registry.name, run_id, export, tags,
                                image_chw=expected_chw(read_manifest(ctx.data_dir)))
        tracking.set_alias(ref.name, "candidate", ref.version)
        promoted = promote_stage(ctx, name, ref, inputs).promoted
        status = "FINISHED"
        shown = {k: round(v, 4) for k, v in metrics.items()}
        log.info("[%s] registered %s v%s%s  %s", name, ref.name, ref.version,
                 " → champion" if promoted else "", shown)
        return StageOutcome(name, "trained", ref.version, promoted, metrics, time.perf_counter() - t0)
    finally:
        client.set_terminated(run_id, status)
