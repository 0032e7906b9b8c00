"""overhead: steady-state step time of a stage under Ray Train + DeepSpeed against the same
per-worker loop in one plain process with a plain optimizer; and `pipeline run` to first step.

Stage: the autoencoder of `jobs/ldm.yaml` (KL-VAE, 16 px digits, batch 64, 1 torch thread),
`--steps` steps of `pipeline.train.loop.train_loop`; the plain contenders read the split from memory
(`tensor_stream`), the Ray Train ones stream it (`worker_stream`, Ray Data tasks beside the step).
Step times come from the loop's own `WorkerContext.step_times` (next batch -> optimizer step ->
EMA), median of the steps after `--skip`. Contenders, interleaved in one process and Ray instance, `--repeats` rounds:

* plain + AdamW: `run_plain` with `make_engine` swapped for a plain AdamW/warmup/clipping engine
  (same loop, same task, no DeepSpeed).
* plain + DeepSpeed: `run_plain` as it is (one-process gloo group, DeepSpeed engine, ZeRO-1).
* Ray Train + DeepSpeed: a `TorchTrainer` with 1 worker (the same batch per step), whose
  per-worker function mirrors `pipeline.train.ray_worker.worker_main` (same task, `worker_stream`,
  `train_loop`) and writes the loop's step/wait times after its last step. Also gives
  fit() -> first step, and the workers' data-wait share.
* Ray Train + DeepSpeed, 2 workers (the job's scale; batch 32 per worker, 2 processes on this
  machine's cores): reported for reference, not part of the overhead ratio.

Cold start: `pipeline run jobs/ldm.yaml` in a fresh directory (data built, Ray started, MLflow store
created), timed from the process start to the line of the first training step; then interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.bench import Options, Report, interleave, median
from pipeline.bench.data import AE_STAGE, ensure_shards

REPO = Path(__file__).resolve().parents[2]


class PlainEngine:
    """The part of the DeepSpeed engine API `train_loop` uses, on a plain AdamW optimizer."""

    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float, warmup_steps: int,
                 grad_clip: float, device: torch.device, **_: Any) -> None:
        self.module = model.to(device)
        self.grad_clip = grad_clip
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                     weight_decay=weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)
        self.optimizer, self.lr_scheduler = self.opt, self.sched  # what `engine.full_state` reads at stage 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.opt.param_groups]

    def zero_optimization_stage(self) -> int:
        return 0

    def save_checkpoint(self, directory: str, tag: str, save_latest: bool = False) -> None:
        out = Path(directory) / tag
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.module.state_dict(), "opt": self.opt.state_dict()}, out / "plain.pt")


class TimedTask:
    """A task whose `loss` notes the calling thread's CPU clock: per-step CPU = difference of marks.

    The loop calls `loss` once per step, in the thread that runs the step (Ray Train's training
    thread in a worker), so consecutive marks bracket one whole step (batch, forward, backward,
    optimizer, EMA) as far as that thread's own CPU goes, independent of the machine's load.
    """

    def __init__(self, task: Any) -> None:
        self.task = task
        self.cpu_marks: list[float] = []

    def build_model(self) -> nn.Module:
        return self.task.build_model()

    def loss(self, model: Any, batch: dict[str, Any], gen: torch.Generator) -> Any:
        self.cpu_marks.append(time.thread_time())
        return self.task.loss(model, batch, gen)

    def model_recipe(self) -> tuple[str, dict[str, Any]]:
        return self.task.model_recipe()

    def export_extra(self) -> dict[str, Any]:
        return self.task.export_extra()

    def step_cpu(self) -> list[float]:
        return list(np.diff(self.cpu_marks)) if len(self.cpu_marks) > 1 else []


def _train_cfg(steps: int, batch: int) -> dict[str, Any]:
    return {"steps": steps, "batch_size": batch, "lr": 2e-3, "warmup_steps": 20, "checkpoint_every": steps,
            "log_every": 10**9, "torch_threads": 1}


SCALE: dict[str, Any] = {"gpus_per_worker": 0, "zero_stage": 1, "precision": "auto", "cpus_per_worker": 1}


def plain_run(data_dir: Path, steps: int, batch: int, plain_optimizer: bool) -> dict[str, Any]:
    """The loop in this process on the split held in memory (`tensor_stream`, so no step waits on decoding: the
    old batch cache); returns its step and wait times."""
    import pipeline.train.loop as loop
    from pipeline.data import load_split
    from pipeline.train.tasks import AutoencoderTask

    split = load_split(data_dir, "train", limit=None)
    data = {"image": torch.from_numpy(split["image"]), "label": torch.from_numpy(split["label"])}
    original = loop.make_engine
    if plain_optimizer:
        loop.make_engine = PlainEngine  # type: ignore[assignment]
    threads = torch.get_num_threads()
    task = TimedTask(AutoencoderTask(AE_STAGE))
    try:
        stream = loop.tensor_stream(data, rank=0, world=1, micro=batch, seed=0)
        _, ctx, _ = loop.run_plain(task, _train_cfg(steps, batch), SCALE, stream, seed=0)
    finally:
        loop.make_engine = original
        torch.set_num_threads(threads)
    return {"step_times": ctx.step_times, "wait_times": ctx.wait_times, "step_cpu": task.step_cpu()}


def bench_worker(config: dict[str, Any]) -> None:
    """`worker_main` of `pipeline.train.ray_worker` (the stream of `pipeline.data.ray_data.worker_stream`), plus the
    loop's timings written by each rank to `timings_dir/rank{r}.json` after its last step."""
    import ray.train as rt

    from pipeline.data.ray_data import worker_stream
    from pipeline.train.loop import WorkerContext, batch_tensors, train_loop
    from pipeline.train.ray_worker import build_task, setup_worker_logging

    setup_worker_logging()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rctx = rt.get_context()
    rank, world = rctx.get_world_rank(), rctx.get_world_size()
    task = TimedTask(build_task(config))
    train = config["stage"]["train"]
    micro = max(1, train["batch_size"] // world)
    spec = config["data"]
    first_batch: list[float] = []

    def batches(start: int, count: int):
        for _, nb in worker_stream(spec, rank=rank, world=world, micro=micro, start=start, count=count):
            if not first_batch:
                first_batch.append(time.time())
            yield int(nb["epoch"][0]), batch_tensors(nb, ctx.skipped_keys, rank)

    ctx: WorkerContext

    def report(metrics: dict[str, float], ckpt_dir: str | None) -> None:
        if int(metrics.get("step", 0)) >= int(train["steps"]):
            first_step = first_batch[0] + ctx.step_times[0] - ctx.wait_times[0] if first_batch else None
            Path(config["timings_dir"], f"rank{rank}.json").write_text(json.dumps({
                "step_times": ctx.step_times, "wait_times": ctx.wait_times, "step_cpu": task.step_cpu(),
                "first_batch_unix": first_batch[0] if first_batch else None, "first_step_done_unix": first_step}))
        rt.report(metrics, checkpoint=rt.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None)

    ctx = WorkerContext(rank=rank, world_size=world, batches=batches, report=report, dataset_size=spec.size)
    train_loop(task, train, config["stage"]["scale"], ctx, seed=config["seed"])


def ray_run(data_dir: Path, steps: int, batch: int, workers: int, storage: str, shift: int = 0) -> dict[str, Any]:
    """One Ray Train fit of the stage streaming `data_dir` (augmentation `shift`); rank 0's step/wait times (also
    every rank's, under `ranks`), fit() -> first batch and fit() -> first step (the later rank)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.data.stream import spec_for

    stage = {**AE_STAGE, "train": _train_cfg(steps, batch), "scale": {**SCALE, "workers": workers}}
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # as `fit_stage` does
    timings_dir = Path(tempfile.mkdtemp(prefix="timings-", dir=storage))
    config = {"stage": stage, "seed": 0, "data": spec_for(str(data_dir), "train", seed=0, shift=shift),
              "timings_dir": str(timings_dir)}
    trainer = TorchTrainer(
        bench_worker, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"bench-overhead-{time.time_ns()}", storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
        torch_config=TorchConfig(backend="gloo"))
    t0 = time.time()
    result = trainer.fit()
    wall = time.time() - t0
    error = result.error
    del result, trainer  # nothing of Ray's outlives ray.shutdown()
    if error:
        raise error
    ranks = [json.loads((timings_dir / f"rank{r}.json").read_text()) for r in range(workers)]
    firsts = [r.pop("first_step_done_unix") for r in ranks]
    batches = [r.pop("first_batch_unix") for r in ranks]
    known = [f for f in firsts if f]
    return {**ranks[0], "ranks": ranks, "fit_wall_s": wall,
            "fit_to_first_step_s": (max(known) - t0) if known else float("nan"),
            "fit_to_first_batch_s": (max(b for b in batches if b) - t0) if any(batches) else float("nan")}


def cold_start(timeout: float = 300.0) -> dict[str, float]:
    """Seconds from starting `pipeline run jobs/ldm.yaml` in a fresh directory to its first step."""
    import psutil

    exe = Path(sys.executable).with_name("pipeline")
    base = [str(exe)] if exe.is_file() else [sys.executable, "-m", "pipeline"]
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as work:
        env = {**os.environ, "RAY_TMPDIR": str(Path(work) / "ray"), "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        env.pop("MLFLOW_TRACKING_URI", None)
        (Path(work) / "ray").mkdir()
        cmd = [*base, "run", str(REPO / "jobs" / "ldm.yaml"), "--set", "stages.autoencoder.train.log_every=1"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        marks: dict[str, float] = {}
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - t0
            if "built data/" in line and "data_built_s" not in marks:
                marks["data_built_s"] = now
            if re.search(r"\bstep 1/\d+", line):
                marks["first_step_s"] = now
                break
            if now > timeout:
                break
        descendants = []
        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        proc.send_signal(signal.SIGINT)  # the CLI's interrupt path shuts Ray down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for p in descendants:  # anything of ours still alive, by process id
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.stdout.close()
    return marks


def run(opts: Options) -> Report:
    """Interleaved plain / DeepSpeed / Ray Train runs of the same stage, then the CLI cold start."""
    p = argparse.ArgumentParser(prog="pipeline bench overhead")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=25, help="steps left out of the steady state (first epoch)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--two-workers", action="store_true", help="add a 2-worker Ray Train reference row")
    p.add_argument("--cold-runs", type=int, default=2, help="`pipeline run` cold starts (median)")
    p.add_argument("--no-cold-start", action="store_true", help="skip the `pipeline run` cold start")
    a = p.parse_args(opts.extra)
    repeats = opts.repeats or (1 if opts.quick else 3)
    if opts.quick:
        a.steps, a.skip, a.two_workers, a.no_cold_start = 8, 4, False, True
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pipeline.bench.data import init_ray

    d = ensure_shards(16)
    init_ray(8)  # the job's in-process Ray: 8 logical CPUs
    runs: dict[str, list[dict[str, Any]]] = {}
    storage = tempfile.mkdtemp(prefix="bench-overhead-")

    def contender(name: str, fn) -> tuple[float, float]:
        r = fn()
        runs.setdefault(name, []).append(r)
        return median(r["step_times"][a.skip:]), median(r["step_cpu"][a.skip - 1:])

    fns = {
        "plain process + AdamW": lambda: contender("plain", lambda: plain_run(d, a.steps, a.batch, True)),
        "plain process + DeepSpeed": lambda: contender("plain_ds", lambda: plain_run(d, a.steps, a.batch, False)),
        "Ray Train + DeepSpeed, 1 worker": lambda: contender(
            "ray1", lambda: ray_run(d, a.steps, a.batch, 1, storage)),
    }
    if a.two_workers:
        fns["Ray Train + DeepSpeed, 2 workers (ref.)"] = lambda: contender(
            "ray2", lambda: ray_run(d, a.steps, a.batch, 2, storage))
    times = interleave(fns, repeats, warmup=0)
    wall = {n: median([t[0] for t in ts]) for n, ts in times.items()}
    cpu = {n: median([t[1] for t in ts]) for n, ts in times.items()}
    plain, ray1 = "plain process + AdamW", "Ray Train + DeepSpeed, 1 worker"
    rows: list[dict[str, Any]] = []
    for name, key in zip(times, runs, strict=True):
        rs = runs[key]
        wait = [sum(r["wait_times"][1:]) / sum(r["step_times"][1:]) for r in rs]
        first = [r.get("fit_to_first_step_s", float("nan")) for r in rs]
        rows.append({"contender": name, "wall s/step": wall[name], "wall vs plain": wall[name] / wall[plain],
                     "CPU s/step (training thread)": cpu[name], "CPU vs plain": cpu[name] / cpu[plain],
                     "data-wait share": median(wait), "fit() to first step (s)": median(first),
                     "runs": len(times[name])})
    ratios = {"ray_train_deepspeed_overhead_per_step": wall[ray1] / wall[plain] - 1,
              "ray_train_deepspeed_overhead_per_step_cpu": cpu[ray1] / cpu[plain] - 1,
              "deepspeed_overhead_per_step": wall["plain process + DeepSpeed"] / wall[plain] - 1,
              "deepspeed_overhead_per_step_cpu": cpu["plain process + DeepSpeed"] / cpu[plain] - 1,
              "ray_train_worker_data_wait_share": rows[2]["data-wait share"],
              "ray_train_fit_to_first_step_s": rows[2]["fit() to first step (s)"]}
    notes = [f"autoencoder stage, 16 px digits, batch {a.batch}, {a.steps} steps, steady state = median step "
             f"{a.skip + 1}..{a.steps} of each run, then median over runs; 1 torch thread; "
             "CPU = the training thread's CPU time per step (load-independent; misses work in other threads "
             "and processes, which wall time includes)",
             "data-wait share: sum of waits / sum of step times over steps 2..N of each run (includes the "
             "first, streamed epoch); for Ray Train measured inside worker rank 0"]
    if not a.no_cold_start:
        cs = [cold_start() for _ in range(a.cold_runs)]
        firsts = [c.get("first_step_s", float("nan")) for c in cs]
        rows.append({"contender": "`pipeline run jobs/ldm.yaml`, fresh directory: start to first step",
                     "fit() to first step (s)": median(firsts), "runs": len(cs)})
        ratios["pipeline_run_to_first_step_s"] = median(firsts)
        notes.append(f"cold start detail: {cs}")
    import gc

    import ray

    gc.collect()  # no Ray object may outlive the instance it belongs to
    ray.shutdown()
    return Report(name="overhead", command="python -m pipeline.bench overhead",
                  columns=["contender", "wall s/step", "wall vs plain", "CPU s/step (training thread)",
                           "CPU vs plain", "data-wait share", "fit() to first step (s)", "runs"],
                  rows=rows, ratios=ratios,
                  goals={"ray_train_deepspeed_overhead_per_step": "< 0.10",
                         "ray_train_worker_data_wait_share": "< 0.05"},
                  notes=notes, params=vars(a) | {"repeats": repeats,
                                                 "runs": {k: [{kk: vv for kk, vv in r.items() if kk.endswith("_s")}
                                                              for r in v] for k, v in runs.items()}})


__all__ = ["PlainEngine", "bench_worker", "cold_start", "plain_run", "ray_run", "run"]
