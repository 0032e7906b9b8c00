"""The per-worker training loop: one code path under Ray Train and in a plain process.

The loop knows nothing about Ray: it gets a `WorkerContext` that says who it is, where its
batches come from, how to report metrics and checkpoints, and which checkpoint to resume.
`pipeline.train.ray_worker` builds that context from Ray Train; `run_plain` builds it for
one process (world_size=1), which is how unit tests and GPU benchmarks run the same loop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from pipeline.train.ema import EMA
from pipeline.train.engine import (
    autocast,
    device_for,
    effective_zero_stage,
    engine_step,
    full_state,
    gathered_params,
    load_module_state,
    load_optimizer_state,
    make_engine,
    resolve_precision,
)
from pipeline.train.export import export_weights
from pipeline.train.tasks import Task

log = logging.getLogger("pipeline.train")

CKPT_TAG = "ckpt"
STATE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
TRAIN_STATE = "train_state.safetensors"  # weights + Adam moments, whole: loads into any ZeRO stage / worker count
EXPORT_DIR = "export"
MAX_NONFINITE_IN_A_ROW = 20  # with on_nonfinite=skip: this many non-finite losses in a row stop the stage


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf and the spec says to stop."""


Stream = Callable[[int, int], Iterator[tuple[int, dict[str, Any]]]]
"""(first global batch, batches wanted) -> endless (epoch, batch) of this worker, that batch first."""


@dataclass
class WorkerContext:
    """What the loop needs from its surroundings."""

    rank: int
    world_size: int
    # This worker's batches from a global batch number on. A job's workers stream their shards in the order of
    # `pipeline.data.stream` (global batch b is a function of the seed and b), so the step is the data position.
    batches: Stream
    report: Callable[[dict[str, float], str | None], None]  # (metrics, checkpoint dir or None)
    resume_dir: str | None = None
    log_metrics: Callable[[dict[str, float], int], None] | None = None
    extra_metrics: dict[str, float] = field(default_factory=dict)  # merged into every report
    skipped_keys: set[str] = field(default_factory=set)  # corrupt samples skipped (data.on_corrupt=skip)
    dataset_size: int | None = None  # samples per epoch, to report data/samples
    step_times: list[float] = field(default_factory=list)
    wait_times: list[float] = field(default_factory=list)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(),
             "numpy": torch.tensor(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_stream(batches: Callable[[int], Iterator[dict[str, Any]]]) -> Stream:
    """A `Stream` from a function epoch -> that epoch's batches (synthetic data in tests and benchmarks):
    resuming at batch b skips the first b batches."""
    def stream(start: int, count: int) -> Iterator[tuple[int, dict[str, Any]]]:
        epoch, b = 0, 0
        while True:
            n = 0
            for batch in batches(epoch):
                n += 1
                if b >= start:
                    yield epoch, batch
                b += 1
            if n == 0:
                raise RuntimeError("the worker received no training batches (too few samples?)")
            epoch += 1
    return stream


def tensor_stream(data: dict[str, torch.Tensor], *, rank: int, world: int, micro: int, seed: int) -> Stream:
    """A `Stream` over tensors already in memory (unit tests of the loop; jobs always stream shards).

    Global batch b is rows [i·G, (i+1)·G) of a permutation of all N rows seeded by (seed, e), where
    G = micro·world, e = b // (N // G) and i = b mod (N // G); this worker takes its micro-slice.
    """
    n, g = len(data["label"]), micro * world
    per_epoch = n // g
    if per_epoch == 0:
        raise RuntimeError(f"{n} training samples are fewer than one global batch of {g}; lower train.batch_size")

    def stream(start: int, count: int) -> Iterator[tuple[int, dict[str, Any]]]:
        perm, perm_epoch, b = torch.empty(0, dtype=torch.long), -1, start
        while True:
            epoch, i = divmod(b, per_epoch)
            if epoch != perm_epoch:
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
                perm_epoch = epoch
            idx = perm[i * g + rank * micro:i * g + (rank + 1) * micro]
            yield epoch, {k: v[idx] for k, v in data.items() if torch.is_tensor(v)}
            b += 1
    return stream


def batch_tensors(b: dict[str, Any], skipped_keys: set[str], rank: int = 0) -> dict[str, torch.Tensor]:
    """A numpy batch of `pipeline.data.stream.read_batches` as the loop's tensors; corrupt rows dropped (their
    keys added to `skipped_keys`)."""
    from pipeline.data import DataError
    from pipeline.data.decode import to_unit_range
    from pipeline.models.text import captions_to_bytes

    ok = np.asarray(b["ok"], bool)
    if not ok.all():
        new = {str(k) for k in b["key"][~ok]} - skipped_keys
        if new:
            log.warning("rank %d: corrupt training sample(s) skipped (data.on_corrupt=skip): %s", rank,
                        ", ".join(sorted(new)))
        skipped_keys.update(new)
        if not ok.any():
            raise DataError(f"every sample of global batch {int(b['batch'][0])} on rank {rank} is corrupt; "
                            "check the shards")
        b = {k: v[ok] for k, v in b.items()}
    image = b["image"]
    image = to_unit_range(image) if image.dtype == np.uint8 else np.ascontiguousarray(image, np.float32)
    out = {"image": torch.from_numpy(image),  # (B, C, H, W) float32
           "label": torch.from_numpy(np.array(b["label"], np.int64))}  # (B,)
    # strings, as fixed-width UTF-8 bytes: batches stay tensors
    out["caption_bytes"] = captions_to_bytes([str(c) for c in b["caption"]])  # (B, 256) uint8
    return out


def shard_stream(spec: Any, *, rank: int, world: int, micro: int, skipped_keys: set[str] | None = None) -> Stream:
    """This rank's batches read from the shards in this process, in the order of `pipeline.data.stream` (the
    order the Ray workers read; used where there is no Ray: multi-process tests, benchmarks)."""
    from pipeline.data.stream import plain_batches

    skipped = skipped_keys if skipped_keys is not None else set()

    def stream(start: int, count: int) -> Iterator[tuple[int, dict[str, Any]]]:
        for _, nb in plain_batches(spec, rank=rank, world=world, micro=micro, start=start):
            yield int(nb["epoch"][0]), batch_tensors(nb, skipped, rank)
    return stream


def _global_mean(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average logged sums over the workers, so a logged loss is the loss of the global batch."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist(), strict=True)}


def _all_true(flag: bool, device: torch.device) -> bool:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def train_loop(task: Task, train: dict[str, Any], scale: dict[str, Any], ctx: WorkerContext, *,
               seed: int) -> dict[str, float]:
    """Train `task` for `train['steps']` global steps; returns the last logged metrics.

    Every `checkpoint_every` steps (and at the end) a checkpoint holding the DeepSpeed state
    (model, optimizer, scheduler), the EMA weights, the step and the RNG state is reported.
    The last report also carries the exported EMA weights (safetensors) under `export/`.
    """
    device = device_for(scale.get("gpus_per_worker", 0.0))
    precision = resolve_precision(scale.get("precision", "auto"), device)
    torch.set_num_threads(int(train.get("torch_threads", 1)))
    _seed_all(seed * 1000 + ctx.rank)

    model = task.build_model()
    resume_state: dict[str, Any] | None = None
    if ctx.resume_dir:  # weights go in before DeepSpeed partitions the model (ZeRO-3)
        resume_state = json.loads((Path(ctx.resume_dir) / STATE).read_text())
        if not (Path(ctx.resume_dir) / TRAIN_STATE).is_file():
            raise RuntimeError(f"checkpoint {ctx.resume_dir} has no {TRAIN_STATE} (written by an older version); "
                               "remove the stage's run directory under ray.storage to start the stage over")
        resume_tensors = load_file(str(Path(ctx.resume_dir) / TRAIN_STATE))
        load_module_state(model, resume_tensors)
    micro = max(1, train["batch_size"] // ctx.world_size)
    grad_clip = float(train.get("grad_clip", 1.0))
    engine = make_engine(model, lr=train["lr"], weight_decay=train.get("weight_decay", 0.0),
                         warmup_steps=train.get("warmup_steps", 0), micro_batch=micro,
                         zero_stage=effective_zero_stage(scale.get("zero_stage", 1), ctx.world_size, device),
                         grad_clip=grad_clip,
                         device=device, precision=precision)
    with gathered_params(engine):
        ema = EMA(engine.module, train.get("ema_decay", 0.999))

    step = 0
    skipped = 0
    gen = torch.Generator(device=device).manual_seed(seed * 7919 + ctx.rank * 104729)
    if ctx.resume_dir and resume_state is not None:
        # Not DeepSpeed's own (pickled) checkpoint: safetensors + JSON, whatever the saved topology.
        load_optimizer_state(engine, resume_tensors, resume_state)
        step, skipped = int(resume_state["step"]), int(resume_state.get("skipped", 0))
        ctx.skipped_keys.update(resume_state.get("skipped_keys", []))
        ema.load_state_dict(load_file(str(Path(ctx.resume_dir) / EMA_FILE)))
        rng_file = Path(ctx.resume_dir) / f"rng_rank{ctx.rank}.safetensors"
        if rng_file.is_file():
            rng = load_file(str(rng_file))
            _set_rng_state(rng)
            gen.set_state(rng["gen"])
        log.info("rank %d resumed at step %d from %s (saved by %s worker(s), ZeRO-%s)", ctx.rank, step,
                 ctx.resume_dir, resume_state.get("world_size", "?"), resume_state.get("zero_stage", "?"))

    total = int(train["steps"])
    resumed_at = step
    every = int(train["checkpoint_every"])
    log_every = int(train.get("log_every", 10))
    on_nonfinite = train.get("on_nonfinite", "stop")
    metrics: dict[str, float] = {}
    sums: dict[str, float] = {}
    count = 0
    batches = ctx.batches(step + skipped, total - step)  # the data position: one global batch per step taken
    nonfinite_in_a_row = 0
    t_log = time.perf_counter()

    while step < total:
        t0 = time.perf_counter()
        epoch, batch = next(batches)
        t1 = time.perf_counter()
        batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with autocast(precision, device):
            loss, parts = task.loss(engine, batch, gen)
        finite = _all_true(bool(torch.isfinite(loss).item()), device)
        if not finite:
            if on_nonfinite == "stop":
                raise NonFiniteLoss(f"non-finite loss at step {step}; stopping (train.on_nonfinite=stop). Lower "
                                    "train.lr, check the data, or set train.on_nonfinite=skip to skip such steps")
            skipped += 1
            nonfinite_in_a_row += 1
            log.warning("rank %d: non-finite loss at step %d skipped (%d skipped so far)", ctx.rank, step, skipped)
            if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise NonFiniteLoss(f"{nonfinite_in_a_row} non-finite losses in a row at step {step} "
                                    f"(train.on_nonfinite=skip); the run is diverging: lower train.lr or check the "
                                    "data")
            continue
        nonfinite_in_a_row = 0
        engine.backward(loss)
        engine_step(engine, grad_clip)
        with gathered_params(engine):
            ema.update(engine.module, step)
        step += 1
        ctx.wait_times.append(t1 - t0)
        ctx.step_times.append(time.perf_counter() - t0)
        for k, v in {"loss": loss, **parts}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        count += 1
        if step % log_every == 0 or step == total:
            metrics = {f"train/{k}": v / count for k, v in _global_mean(sums, device).items()}
            metrics["train/lr"] = float(engine.get_lr()[0])
            metrics["train/epoch"] = float(epoch)
            metrics["train/skipped_steps"] = float(skipped)
            elapsed = time.perf_counter() - t_log
            metrics["train/steps_per_sec"] = count / max(elapsed, 1e-9)
            window = ctx.step_times[-count:]
            metrics["train/data_wait"] = sum(ctx.wait_times[-count:]) / max(sum(window), 1e-9)  # share of step time
            sums, count, t_log = {}, 0, time.perf_counter()
            if ctx.rank == 0:
                log.info("step %d/%d  %s", step, total,
                         "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items()
                                   if k in ("train/loss", "train/steps_per_sec")))
                if ctx.log_metrics:
                    ctx.log_metrics(metrics, step)
        if step % every == 0 or step == total:
            _save_and_report(engine, ema, task, ctx, step, skipped, metrics, gen, final=step == total)
    if resumed_at >= total:  # resumed after the last step: report the final export again
        _save_and_report(engine, ema, task, ctx, step, skipped, metrics, gen, final=True)
    return metrics


def _gather_skipped(ctx: WorkerContext) -> None:
    """Every rank learns the corrupt samples any rank skipped; reported as data/skipped_samples."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, sorted(ctx.skipped_keys))
        for keys in every:
            ctx.skipped_keys.update(keys)
    if ctx.skipped_keys or ctx.dataset_size is not None:
        ctx.extra_metrics["data/skipped_samples"] = float(len(ctx.skipped_keys))
    if ctx.dataset_size is not None:
        ctx.extra_metrics["data/samples"] = float(ctx.dataset_size - len(ctx.skipped_keys))


def _save_and_report(engine, ema: EMA, task: Task, ctx: WorkerContext, step: int, skipped: int,
                     metrics: dict[str, float], gen: torch.Generator, final: bool) -> None:
    for v in ema.state_dict().values():
        if not torch.isfinite(v).all():
            raise NonFiniteLoss(f"non-finite EMA weights at step {step}; the checkpoint is not written and "
                                "nothing is registered. Lower train.lr or check the data")
    tensors, opt_meta = full_state(engine)  # a collective: every rank takes part
    _gather_skipped(ctx)  # a collective too
    if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
        raise NonFiniteLoss(f"non-finite weights or optimizer state at step {step}; the checkpoint is not written "
                            "and nothing is registered. Lower train.lr or check the data")
    with tempfile.TemporaryDirectory(prefix="pipeline-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=CKPT_TAG, save_latest=False)
        save_file({k: v.contiguous() for k, v in {**_rng_state(), "gen": gen.get_state()}.items()},
                  str(Path(tmp) / f"rng_rank{ctx.rank}.safetensors"))
        if ctx.rank == 0:
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(Path(tmp) / EMA_FILE))
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(tmp) / TRAIN_STATE))
            (Path(tmp) / STATE).write_text(json.dumps({
                "step": step, "skipped": skipped, "world_size": ctx.world_size,
                "data_position": step + skipped, "skipped_keys": sorted(ctx.skipped_keys)[:10_000],
                "zero_stage": engine.zero_optimization_stage(), **opt_meta}))
            if final:
                name, args = task.model_recipe()
                export_weights(ema.state_dict(), name, args, Path(tmp) / EXPORT_DIR,
                               extra=task.export_extra())
        report_metrics = {k: v for k, v in {**metrics, **ctx.extra_metrics}.items() if math.isfinite(v)}
        report_metrics["step"] = float(step)
        ctx.report(report_metrics, tmp)


def run_plain(task: Task, train: dict[str, Any], scale: dict[str, Any],
              batches: Stream, *, seed: int = 0,
              checkpoint_root: str | None = None, resume_dir: str | None = None,
              log_metrics: Callable[[dict[str, float], int], None] | None = None,
              ) -> tuple[dict[str, float], WorkerContext, list[str]]:
    """Run the loop in this process (world_size=1, no Ray). Checkpoints are copied under
    `checkpoint_root/step-N` when given; returns (metrics, context, checkpoint dirs). `batches` is a
    `Stream`: `tensor_stream`, `epoch_stream`, or shards read in this process (`pipeline.data.stream`)."""
    import shutil

    saved: list[str] = []

    def report(metrics: dict[str, float], ckpt: str | None) -> None:
        if ckpt and checkpoint_root:  # copied under a temporary name, then renamed: never half there
            dst = Path(checkpoint_root) / f"step-{int(metrics['step']):08d}"
            tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                shutil.copytree(ckpt, tmp)
                if dst.exists():
                    shutil.rmtree(dst)
                os.replace(tmp, dst)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            saved.append(str(dst))

    ctx = WorkerContext(rank=0, world_size=1, batches=batches, report=report, resume_dir=resume_dir,
                        log_metrics=log_metrics)
    metrics = train_loop(task, train, scale, ctx, seed=seed)
    return metrics, ctx, saved
