"""data: samples/s of the Ray Data WebDataset stream against `webdataset`'s `WebLoader` on the
same shards, and the share of step time a real training stage spends waiting for its next batch.

Both readers do the same work per sample: read the ustar shards, decode only our members with
`pipeline.data.decode.decode_sample` (PNG -> float32 CHW in [-1, 1], label, caption), augment with
`pipeline.data.augment.augment_batch` as `jobs/ldm.yaml` asks (`--shift 1`, `--hflip` off) and
collate batches of `--batch` torch tensors.

* Ray Data: `pipeline.data.ray_data.ray_dataset` (read_webdataset + decoding map_batches) and the
  augmentation `map_batches` the stages add, through `torch_batches`; `--epochs` copies of the
  train split joined with `union`, in in-process Ray with `--ray-cpus` logical CPUs. Each timed
  pass includes the pipeline's start-up, as every epoch of training does.
* webdataset: `WebDataset(shards * epochs).map(decode).batched(collate + augment)` in a
  `WebLoader` with `--workers` worker processes.

Besides samples/s (wall), each pass records the CPU seconds of the whole process tree (this
process, the loader's workers, Ray's workers), so CPU per sample is compared too: on a machine
shared with other jobs the wall rate mostly measures the CPU share the scheduler granted.

The data-wait share is measured on the autoencoder stage of `jobs/ldm.yaml` (model, objective,
16 px images as in the job, batch 64), run by `pipeline.train.loop.run_plain` in this process
(DeepSpeed engine, one worker, no batch cache so every step streams) fed by the Ray Data iterator: the loop's own
`WorkerContext.wait_times / step_times`, first step (pipeline start-up) excluded.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench import RESULTS_DIR, Options, Report, interleave, median, tree_cpu_seconds

AE_STAGE: dict[str, Any] = {
    "kind": "autoencoder",
    "model": {"name": "kl_vae", "args": {"in_channels": 1, "base_channels": 32, "channel_mult": [1, 2],
                                         "num_res_blocks": 1, "latent_channels": 2}},
    "objective": {"beta": 1.0e-5},
}


def ensure_shards(image_size: int) -> Path:
    """Digits shards of `image_size` px under bench-results/data (built once)."""
    from pipeline.data import build_dataset

    d = RESULTS_DIR / "data" / f"digits{image_size}"
    if not (d / "manifest.json").is_file():
        build_dataset("digits", d, image_size=image_size, held_out=0.15, seed=0)
    return d


def init_ray(num_cpus: int) -> None:
    """A fresh in-process Ray instance (never one another user started on this machine)."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 logging_config=ray.LoggingConfig(log_level="WARNING"),
                 runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore"}})
    DataContext.get_current().enable_progress_bars = False


def augmented(ds: Any, aug: dict[str, Any]) -> Any:
    """The augmentation step the stages add to the pixel dataset (`pipeline.stages.pixel_dataset`)."""
    from pipeline.data.augment import augment_batch

    if not (aug.get("hflip") or aug.get("shift")):
        return ds
    return ds.map_batches(augment_batch, batch_format="numpy", fn_kwargs=aug)


def ray_pass(directory: Path, epochs: int, batch: int, aug: dict[str, Any]) -> int:
    """One pass of the Ray Data stream; returns the number of samples delivered."""
    from pipeline.data.ray_data import ray_dataset, torch_batches

    ds = ray_dataset(directory, "train")
    if epochs > 1:
        ds = ds.union(*[ray_dataset(directory, "train") for _ in range(epochs - 1)])
    ds = augmented(ds, aug)
    n = 0
    for b in torch_batches(ds, batch, drop_last=False):
        n += len(b["image"])
    return n


def _wds_decode(sample: dict[str, Any]) -> dict[str, Any]:
    from pipeline.data.decode import decode_sample

    return decode_sample(sample)


def _wds_collate(samples: list[dict[str, Any]], aug: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    from pipeline.data.augment import augment_batch

    images = augment_batch({"image": np.stack([s["image"] for s in samples])}, **(aug or {}))["image"]
    return {"image": torch.from_numpy(np.ascontiguousarray(images)),
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
            "caption": [s.get("caption", "") for s in samples], "key": [s["key"] for s in samples]}


def wds_pass(paths: list[str], epochs: int, batch: int, workers: int, aug: dict[str, Any]) -> int:
    """One pass of webdataset's WebLoader over the same shards; returns samples delivered."""
    import functools

    import webdataset as wds

    urls = paths * epochs
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False, workersplitter=wds.split_by_worker)
          .map(_wds_decode).batched(batch, collation_fn=functools.partial(_wds_collate, aug=aug), partial=True))
    loader = wds.WebLoader(ds, batch_size=None, num_workers=min(workers, len(urls)))
    n = 0
    for b in loader:
        n += len(b["image"])
    return n


def wait_share(directory: Path, steps: int, batch: int, aug: dict[str, Any]) -> dict[str, float]:
    """Run the autoencoder stage in-process fed by Ray Data; the loop's data-wait share of step time."""
    import torch

    from pipeline.data.ray_data import ray_dataset, torch_batches
    from pipeline.train.loop import run_plain
    from pipeline.train.tasks import AutoencoderTask

    def batches(epoch: int):
        ds = augmented(ray_dataset(directory, "train", shuffle_seed=epoch), aug)
        for b in torch_batches(ds, batch, drop_last=True, local_shuffle_buffer_size=batch * 4):
            yield {"image": b["image"], "label": b["label"]}

    train = {"steps": steps, "batch_size": batch, "lr": 2e-3, "warmup_steps": 20, "checkpoint_every": 10**9,
             "log_every": 10**9}
    scale = {"gpus_per_worker": 0, "zero_stage": 1, "precision": "auto"}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench-data-"):
        _, ctx, _ = run_plain(AutoencoderTask(AE_STAGE), train, scale, batches, seed=0, cache_batches=False)
    torch.set_num_threads(threads)
    waits, steps_t = np.array(ctx.wait_times[1:]), np.array(ctx.step_times[1:])
    per_epoch = max(1, 1528 // batch)  # digits: 1528 train samples
    boundary = np.arange(len(waits)) % per_epoch == per_epoch - 1  # first step of each new epoch
    return {"share": float(waits.sum() / steps_t.sum()), "median_step_s": float(np.median(steps_t)),
            "median_wait_s": float(np.median(waits)), "mean_wait_s": float(waits.mean()),
            "epoch_start_wait_s": float(waits[boundary].mean()) if boundary.any() else float("nan"),
            "first_step_s": float(ctx.step_times[0]), "steps": float(len(steps_t))}


def run(opts: Options) -> Report:
    """Interleaved Ray Data and WebLoader passes over the same shards, then the data-wait share."""
    p = argparse.ArgumentParser(prog="pipeline bench data")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4, help="passes over the train split per timed run")
    p.add_argument("--workers", type=int, default=2, help="WebLoader worker processes")
    p.add_argument("--ray-cpus", type=int, default=2, help="logical CPUs of in-process Ray")
    p.add_argument("--shift", type=int, default=1, help="augmentation: random shift in pixels (the job's)")
    p.add_argument("--hflip", action="store_true", help="augmentation: random horizontal flips")
    p.add_argument("--steps", type=int, default=80, help="training steps for the data-wait share")
    a = p.parse_args(opts.extra)
    repeats = opts.repeats or (1 if opts.quick else 5)
    if opts.quick:
        a.epochs, a.steps = 1, 12
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from pipeline.data import shard_paths

    torch.set_num_threads(1)
    d = ensure_shards(a.image_size)
    paths = shard_paths(d, "train")
    init_ray(a.ray_cpus)
    aug = {"shift": a.shift, "hflip": a.hflip}
    counts: dict[str, int] = {}

    def rate(name: str, fn) -> tuple[float, float]:
        """(samples per wall second, samples per CPU second of the process tree)."""
        t0, c0 = time.perf_counter(), tree_cpu_seconds()
        counts[name] = fn()
        wall, cpu = time.perf_counter() - t0, tree_cpu_seconds() - c0
        return counts[name] / wall, counts[name] / cpu

    rates = interleave({
        "Ray Data read_webdataset -> torch batches": lambda: rate("ray", lambda: ray_pass(d, a.epochs, a.batch, aug)),
        "webdataset WebLoader": lambda: rate("wds", lambda: wds_pass(paths, a.epochs, a.batch, a.workers, aug)),
    }, repeats, warmup=1)
    rows: list[dict[str, Any]] = []
    for name, rs in rates.items():
        wall = [r[0] for r in rs]
        rows.append({"measurement": name, "samples/run": counts["ray" if name.startswith("Ray") else "wds"],
                     "samples/s (median)": median(wall), "min": min(wall), "max": max(wall),
                     "samples/CPU-s": median([r[1] for r in rs]), "data-wait share": "", "runs": len(rs)})
    ray_rate, wds_rate = (median([r[0] for r in rs]) for rs in rates.values())
    ray_cpu, wds_cpu = (median([r[1] for r in rs]) for rs in rates.values())
    wait_dir = ensure_shards(16)
    ws = wait_share(wait_dir, a.steps, a.batch, aug)
    rows.append({"measurement": "autoencoder stage (16 px, batch 64) fed by Ray Data, in one process",
                 "samples/run": int(ws["steps"]) * a.batch, "samples/s (median)": a.batch / ws["median_step_s"],
                 "min": "", "max": "", "samples/CPU-s": "", "data-wait share": ws["share"], "runs": 1})
    import ray

    ray.shutdown()
    return Report(
        name="data", command="python -m pipeline.bench data",
        columns=["measurement", "samples/run", "samples/s (median)", "min", "max", "samples/CPU-s",
                 "data-wait share", "runs"], rows=rows,
        ratios={"ray_data_vs_webdataset_rate": ray_rate / wds_rate,
                "ray_data_cpu_per_sample_vs_webdataset": wds_cpu / ray_cpu, "data_wait_share": ws["share"]},
        goals={"data_wait_share": "< 0.05", "ray_data_vs_webdataset_rate": ">= 1.0"},
        notes=[f"{a.image_size}x{a.image_size} grey PNG digits, {len(paths)} train shards x {a.epochs} passes per run, "
               f"batch {a.batch}, augmentation {aug}; WebLoader {a.workers} workers; Ray {a.ray_cpus} logical CPUs",
               "last row: the training stage's samples/s; data-wait share = sum of the loop's waits for the next "
               "batch / sum of step times, steps 2..N (step 1 is the pipeline's start-up); "
               f"mean wait at an epoch's first batch {ws['epoch_start_wait_s']:.2f} s (Ray Data restarts its "
               "pipeline every epoch), median wait otherwise "
               f"{ws['median_wait_s'] * 1e3:.1f} ms",
               "ray_data_cpu_per_sample_vs_webdataset = Ray Data's CPU s per sample / webdataset's "
               "(> 1: Ray Data spends more CPU per sample); CPU of the whole process tree"],
        params=vars(a) | {"repeats": repeats, "wait": ws})
