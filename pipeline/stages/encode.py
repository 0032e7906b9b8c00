"""The `encode` stage: latent shards of every split, written by a Ray Data actor pool as it streams.

Nothing is gathered on the driver; per split it sees one small metadata row per shard. Two passes:

1. Scale (LDM's latent scaling, unit variance): 1/std of the latent means over the first
   ``min(N_train, SCALE_SAMPLES)`` training samples in shard order. The actors return per batch only
   float64 (sum, sum of squares, count); the driver adds them up and takes the population std
   sqrt(E[x²] − E[x]²). Up to ``SCALE_SAMPLES`` samples this is the whole split.
2. Write: the actors encode each batch of ``data.shard_size`` samples, multiply by the scale and write it
   as one npy shard ``<split>-<first key>.tar`` into the temporary output directory (unique: a split's
   keys are; stable: Ray Data runs these datasets with ``preserve_order``, so batches are formed the
   same way every time), returning the shard's name, sample count, sha256, size and label counts.

The driver writes ``scale.json`` and ``manifest.json`` (shards sorted by name) and renames the directory
into place; a failed encode leaves nothing behind. With ``ray.latent_cache`` a bucket, each actor writes its
shard locally and uploads it to the prefix, and the manifest, written last, marks the latents complete (a
prefix without one is encoded again); the readers reach them through the manifest `shards.open_dataset`
caches on the driver.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline import tracking
from pipeline.data import storage
from pipeline.data.shards import MANIFEST

if TYPE_CHECKING:
    import ray.data

    from pipeline.config import EncodeStage
    from pipeline.data.decode import OnCorrupt
    from pipeline.data.shards import Manifest
    from pipeline.stages import JobContext, StageOutcome

log = logging.getLogger("pipeline")

#: Training samples (the first ones, in shard order) whose latents set the latent scale.
SCALE_SAMPLES = 4096
SCALE_FILE = "scale.json"  # beside the latent shards: {"latent_scale", "autoencoder"}


class LatentEncoder:
    """Ray Data actor base: the exported autoencoder's latent means of image batches.

    ``device`` is ``cuda`` when the stage gives its actors a GPU; ``chunk`` bounds one forward pass.
    """

    def __init__(self, model_dir: str, device: str = "cpu", threads: int = 1, chunk: int = 256) -> None:
        from pipeline.train.export import load_exported

        torch.set_num_threads(max(1, threads))
        self.device, self.chunk = device, max(1, chunk)
        self.model, _ = load_exported(model_dir, device=device)

    def latents(self, images: np.ndarray) -> np.ndarray:
        """(B, C, H, W) images in [-1, 1] → (B, c, h, w) float32 latent means."""
        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.chunk):
                x = torch.from_numpy(np.ascontiguousarray(images[i:i + self.chunk], dtype=np.float32))
                mean, _ = self.model.encode(x.to(self.device))
                out.append(mean.float().cpu().numpy())
        return np.concatenate(out)


class LatentMoments(LatentEncoder):
    """Pass 1: a batch's float64 latent sum, sum of squares and element count (one row)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(batch["key"]) == 0:  # every sample of the batch skipped as corrupt
            return {"sum": np.zeros(1), "sumsq": np.zeros(1), "count": np.zeros(1, np.int64)}
        z = self.latents(batch["image"]).astype(np.float64)
        return {"sum": np.array([z.sum()]), "sumsq": np.array([np.square(z).sum()]),
                "count": np.array([z.size], dtype=np.int64)}


class LatentShardWriter(LatentEncoder):
    """Pass 2: encode a batch, scale it and write it as one shard; return the shard's metadata (one row)."""

    def __init__(self, model_dir: str, out_dir: str, split: str, scale: float, device: str = "cpu",
                 threads: int = 1, chunk: int = 256) -> None:
        super().__init__(model_dir, device, threads, chunk)
        self.out_dir, self.split, self.scale = str(out_dir), split, float(scale)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.data import write_array_shard

        keys = [str(k) for k in batch["key"]]
        if not keys:
            return {"name": np.array([], dtype=str), "num_samples": np.array([], dtype=np.int64),
                    "sha256": np.array([], dtype=str), "bytes": np.array([], dtype=np.int64),
                    "labels": np.array([], dtype=str), "shape": np.array([], dtype=str)}
        z = self.latents(batch["image"]) * self.scale  # (B, c, h, w) float32
        rows = ({"key": k, "array": z[i], "label": int(batch["label"][i]), "caption": str(batch["caption"][i])}
                for i, k in enumerate(keys))
        name = f"{self.split}-{keys[0]}.tar"
        if storage.is_uri(self.out_dir):  # a bucket: the shard is written here, uploaded, and not kept on this node
            with tempfile.TemporaryDirectory(prefix="latents-") as tmp:
                shard, info = write_array_shard(rows, tmp, name)
                storage.upload(os.path.join(tmp, shard.name), storage.join(self.out_dir, shard.name))
        else:
            shard, info = write_array_shard(rows, self.out_dir, name)
        return {"name": np.array([shard.name]), "num_samples": np.array([shard.num_samples], dtype=np.int64),
                "sha256": np.array([shard.sha256]), "bytes": np.array([shard.bytes], dtype=np.int64),
                "labels": np.array([json.dumps(info.labels)]), "shape": np.array([json.dumps(z.shape[1:])])}


def _ordered(ds: ray.data.Dataset) -> ray.data.Dataset:
    """`ds`, executed in order (its own DataContext copy: nothing else's order changes)."""
    ds.context.execution_options.preserve_order = True
    return ds


def _pool(workers: int) -> ray.data.ActorPoolStrategy:
    """A fixed pool of `workers` actors, each loading the model once."""
    import ray.data

    return ray.data.ActorPoolStrategy(size=workers)


def latent_scale(data_dir: Path, model_dir: str, *, batch_size: int, workers: int = 1, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0, on_corrupt: OnCorrupt = "fail") -> float:
    """1/std (population) of the latent means of the first ``min(N_train, SCALE_SAMPLES)`` training samples."""
    from pipeline.data import DataError, read_manifest
    from pipeline.data.ray_data import ray_dataset

    n = min(read_manifest(data_dir).splits["train"].num_samples, SCALE_SAMPLES)
    device = "cuda" if gpus_per_worker > 0 else "cpu"
    ds = _ordered(ray_dataset(data_dir, "train", on_corrupt=on_corrupt)).limit(n)
    moments = ds.map_batches(LatentMoments, fn_constructor_args=(model_dir, device, int(cpus_per_worker), batch_size),
                             batch_size=batch_size, batch_format="numpy", compute=_pool(workers),
                             num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)
    total, total_sq, count = 0.0, 0.0, 0
    for row in moments.iter_rows():
        total, total_sq, count = total + float(row["sum"]), total_sq + float(row["sumsq"]), count + int(row["count"])
    if count == 0:
        raise DataError(f"the training split of {data_dir} has no samples to encode")
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean * mean, 0.0))
    if not std > 0 or not math.isfinite(std):
        raise ValueError(f"the autoencoder's latents of {data_dir} have std {std}: no latent scale; "
                         "check the autoencoder (a collapsed posterior encodes every image alike)")
    return 1.0 / std


def encode_split(data_dir: Path, model_dir: str, out_dir: Path | str, split: str, scale: float, *, batch_size: int,
                 shard_size: int, workers: int = 1, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                 on_corrupt: OnCorrupt = "fail") -> tuple[dict[str, Any], tuple[int, ...]]:
    """Write the scaled latents of `split` as npy shards into `out_dir`; its manifest entry and the latent shape."""
    from pipeline.data import DataError, ShardInfo, read_manifest
    from pipeline.data.ray_data import ray_dataset

    expected = read_manifest(data_dir).splits[split].num_samples
    device = "cuda" if gpus_per_worker > 0 else "cpu"
    args = (model_dir, str(out_dir), split, scale, device, int(cpus_per_worker), batch_size)
    meta = _ordered(ray_dataset(data_dir, split, on_corrupt=on_corrupt)).map_batches(
        LatentShardWriter, fn_constructor_args=args, batch_size=shard_size, batch_format="numpy",
        compute=_pool(workers), num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)
    rows = sorted(meta.iter_rows(), key=lambda r: str(r["name"]))
    names = [str(r["name"]) for r in rows]
    if len(set(names)) != len(names):
        raise DataError(f"encoding split {split!r} of {data_dir} wrote shard names twice: {names}")
    shapes = {str(r["shape"]) for r in rows}
    if len(shapes) > 1:
        raise DataError(f"encoding split {split!r} of {data_dir} gave latents of several shapes: {sorted(shapes)}")
    shards = [ShardInfo(name=str(r["name"]), num_samples=int(r["num_samples"]), sha256=str(r["sha256"]),
                        bytes=int(r["bytes"])) for r in rows]
    labels: dict[int, int] = {}
    for r in rows:
        for label, k in json.loads(str(r["labels"])).items():
            labels[int(label)] = labels.get(int(label), 0) + int(k)
    total = sum(s.num_samples for s in shards)
    if total == 0:
        raise DataError(f"split {split!r} of {data_dir} has no samples to encode")
    if total > expected or (on_corrupt == "fail" and total != expected):
        raise DataError(f"encoding split {split!r} of {data_dir} wrote {total} latents, its manifest lists "
                        f"{expected} samples")
    info = {"num_samples": total, "labels": dict(sorted(labels.items())), "shards": [s.model_dump() for s in shards]}
    return info, tuple(json.loads(shapes.pop()))


def encode_latents(data_dir: Path, model_dir: str, out_dir: Path | str, *, autoencoder: str, batch_size: int,
                   shard_size: int, workers: int = 1, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                   on_corrupt: OnCorrupt = "fail") -> tuple[float, Manifest]:
    """Write the latent shards of every split of `data_dir`, ``scale.json`` and ``manifest.json`` into `out_dir`.

    `autoencoder` names the model (its models:/ URI) in the manifest and scale.json. Returns the latent scale
    and the manifest. Needs Ray (connected or in-process).
    """
    from pipeline.data import read_manifest, write_manifest
    from pipeline.data.shards import Manifest

    pool = {"workers": workers, "cpus_per_worker": cpus_per_worker, "gpus_per_worker": gpus_per_worker,
            "on_corrupt": on_corrupt}
    manifest = read_manifest(data_dir)
    scale = latent_scale(data_dir, model_dir, batch_size=batch_size, **pool)
    splits, shape = {}, None
    for split in manifest.splits:
        splits[split], shape = encode_split(data_dir, model_dir, out_dir, split, scale, batch_size=batch_size,
                                            shard_size=shard_size, **pool)
    c, h, w = shape
    latent_manifest = Manifest(source=f"latents:{autoencoder}", encoding="npy", image_size=[h, w, c],
                               num_classes=manifest.num_classes, class_names=manifest.class_names,
                               seed=manifest.seed, held_out=manifest.held_out, splits=splits)
    storage.write_bytes(storage.join(str(out_dir), SCALE_FILE),
                        json.dumps({"latent_scale": scale, "autoencoder": autoencoder}).encode())
    write_manifest(out_dir, latent_manifest)  # last: a directory or prefix without it is an unfinished encode
    return scale, latent_manifest


def check_pool(name: str, stage: EncodeStage, *, clustered: bool) -> None:
    """The encode stage's actor pool fits the Ray cluster (or what its autoscaler may add) with a CPU to spare
    for the read tasks that feed it; otherwise Ray Data waits forever. The rule of `check_resources`."""
    import ray

    from pipeline.config import ClusterError
    from pipeline.stages import _has_autoscaler

    now = ray.cluster_resources()
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()  # None without an autoscaler
    except Exception:  # noqa: BLE001 - private API; fall back to what the cluster has now
        most = None
    if most is None and clustered and _has_autoscaler():  # an autoscaler that does not publish its limits
        return
    where = "the autoscaler's cluster config allows" if most else "the Ray cluster has"
    for res, per, field, spare in (("CPU", stage.cpus_per_worker, "cpus_per_worker", 1.0),
                                   ("GPU", stage.gpus_per_worker, "gpus_per_worker", 0.0)):
        need = stage.workers * per + spare
        have = max(now.get(res, 0.0), (most or {}).get(res, 0.0))
        if need > have:
            extra = " + 1 for reading" if spare else ""
            raise ClusterError(f"stage '{name}' needs {need:g} {res} (workers={stage.workers} × {field}={per:g}"
                               f"{extra}) but {where} at most {have:g}; lower stages.{name}.workers or "
                               f"stages.{name}.{field}, or add nodes")


def write_latents(ctx: JobContext, name: str, ref: tracking.ModelRef, out: Path | str) -> StageOutcome:
    """Write the latent shards of every split to `out`: a directory (through a temporary one, renamed into
    place) or a bucket prefix (its manifest written last)."""

    stage = ctx.spec.stages[name]
    check_pool(name, stage, clustered=bool(ctx.spec.ray.address or os.environ.get("RAY_ADDRESS")))
    model_dir = str(tracking.download(ref))
    encode = functools.partial(
        encode_latents, ctx.data_dir, model_dir, autoencoder=ref.uri, batch_size=stage.batch_size,
        shard_size=ctx.spec.data.shard_size, workers=stage.workers, cpus_per_worker=stage.cpus_per_worker,
        gpus_per_worker=stage.gpus_per_worker, on_corrupt=ctx.spec.data.on_corrupt)
    if isinstance(out, str):  # a bucket prefix: no rename there; the manifest, written last, marks it complete
        return _encoded(name, ref, out, *encode(out))
    tmp_out = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp_out.exists():
        shutil.rmtree(tmp_out)
    tmp_out.mkdir(parents=True)
    try:
        scale, manifest = encode(tmp_out)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp_out, out)
    except BaseException:
        shutil.rmtree(tmp_out, ignore_errors=True)  # never leave half-written latents behind
        raise
    return _encoded(name, ref, out, scale, manifest)


def _encoded(name: str, ref: tracking.ModelRef, out: Path | str, scale: float, manifest: Manifest) -> StageOutcome:
    from pipeline.stages import StageOutcome

    log.info("[%s] wrote latents of %s v%s to %s (scale %.4f)", name, ref.name, ref.version,
             storage.display(str(out)), scale)
    return StageOutcome(name, "encoded", metrics={"latent_scale": scale, **{
        f"encode/{split}_samples": float(info.num_samples) for split, info in manifest.splits.items()}})


def latent_info(latents: Path) -> dict[str, Any]:
    """``scale.json`` of an encode stage's latents (``{"latent_scale", "autoencoder"}``), wherever they are: a
    directory, or (named by the manifest `shards.open_dataset` cached for them) a bucket prefix."""
    from pipeline.data import read_manifest

    root = read_manifest(latents).root or str(latents)
    return json.loads(storage.read_bytes(storage.join(root, SCALE_FILE)))


def run_encode(ctx: JobContext, name: str, inputs: dict[str, tracking.ModelRef]) -> StageOutcome:
    """Encode every split with the registered autoencoder (Ray Data batch inference), once per version, in a
    child run of its own (params, the input version, sample counts and the latent scale)."""
    from mlflow.tracking import MlflowClient

    from pipeline.data import manifest_sha256
    from pipeline.stages import StageOutcome, _log_data, log_metrics, redacted_params

    (ae_stage, ref), = inputs.items()
    folder = f"{ref.name}-v{ref.version}-{manifest_sha256(ctx.data_dir)[:12]}"
    cache = ctx.spec.ray.latent_cache
    out: Path | str = storage.join(cache, folder) if storage.is_uri(cache) else Path(cache) / folder
    if storage.file_size(storage.join(str(out), MANIFEST)) is not None:
        log.info("[%s] latents of %s v%s already cached in %s", name, ref.name, ref.version,
                 storage.display(str(out)))
        ctx.latent_dirs[name] = _readable(ctx, out)
        return StageOutcome(name, "cached")
    client = MlflowClient()
    stage = ctx.spec.stages[name]
    run_id = client.create_run(ctx.experiment_id, run_name=name, tags={
        "mlflow.parentRunId": ctx.parent_run_id, "pipeline.stage": name, f"pipeline.input.{ae_stage}": ref.uri,
        "pipeline.latents": str(out), **ctx.source}).info.run_id
    status = "FAILED"
    try:
        tracking.log_params_flat(run_id, redacted_params(stage.model_dump(mode="json")))
        _log_data(ctx, name, run_id)
        outcome = write_latents(ctx, name, ref, out)
        ctx.latent_dirs[name] = _readable(ctx, out)
        log_metrics(run_id, outcome.metrics)
        status = "FINISHED"
        return outcome
    finally:
        client.set_terminated(run_id, status)


def _readable(ctx: JobContext, out: Path | str) -> Path:
    """The name the readers take for written latents at `out`: the directory, or for a bucket prefix the
    manifest that `shards.open_dataset` caches on this machine (its root the prefix)."""
    from pipeline.data.shards import open_dataset

    if isinstance(out, Path):
        return out
    return open_dataset(out, image_size=None, held_out=ctx.spec.data.held_out)

