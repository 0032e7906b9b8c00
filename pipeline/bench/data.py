"""data: the training data path (`pipeline.data.ray_data.worker_stream` inside Ray Train workers) against
`webdataset`'s `WebLoader` on the same shards; the time from `fit()` to the first batch; the data-wait share
of a real training stage; and (`memory`) the peak memory of the whole process tree while streaming splits far
larger than Ray's object store.

Two kinds of data, each read by both contenders:

* `digits`: the bundled 16-px grey PNG digits (`build_dataset("digits", ..., image_size=16)`, 1,528 train
  samples in 3 shards), `--epochs` epochs per pass;
* `photos`: `--photos` (>= 5,000) 256-px RGB JPEGs, random crops of the bundled photographs resized to
  256x256, written once under `bench-results/data/` by our shard writer (`pipeline.data.shards`),
  `--photo-epochs` epochs per pass.

Both contenders do the same work per sample: read the member bytes from the tar, decode only our members
(`decode_sample(uint8=True)`: PNG/JPEG, `.cls`, `.txt`; never pickle), check the shape, augment with
`pipeline.data.stream`'s per-sample augmentation (the job's `shift: 1`; photos also `hflip`), collate uint8
batches and turn them into the loop's tensors with `pipeline.train.loop.batch_tensors` (uint8 -> float32 in
[-1, 1], captions -> bytes) in the consuming process.

* ours: a `TorchTrainer` with `--workers` workers whose train function iterates `worker_stream` (each rank
  its micro-slice of global batches of `--batch`) and converts with `batch_tensors`: Ray Data tasks read,
  decode and augment; the Train workers only convert. Ray runs in-process with `--ray-cpus` logical CPUs
  and its default object store, as `pipeline run jobs/ldm.yaml` starts it (with 2 logical CPUs on this
  2-core machine, Ray Data inside the Train workers gets no CPU budget and hangs).
* webdataset: `WebDataset(shards x epochs)` -> the same decode/augment in `WebLoader` worker processes
  (`--workers`), batches of `--batch` uint8 tensors (shared memory), `batch_tensors` in this process; no
  sample shuffling (its fastest configuration; ours reads in its shuffled order).

A pass is timed from the start of the data path (ours: the Train workers' function, so Ray Train's start-up
is left out; webdataset: the loader's creation) to its last batch, and, for ours, also from `fit()` ("whole
pass"). CPU is that of the whole process tree, sampled per process every 0.2 s by a thread of this process:
for ours every process (this one, Ray's GCS, raylet and agents, the Train controller and its helper actors,
the Train workers, Ray Data's task workers); for webdataset this process and its loader workers (Ray's
processes, idle meanwhile, are left out). One untimed pass of each first, then `--repeats` interleaved
rounds (A, B, B, A, ...), medians reported.

The data-wait share is measured on the autoencoder stage of `jobs/ldm.yaml` at its settings (16 px, batch
64, 2 workers, `shift: 1`, 200 steps) through Ray Train with the pipeline's stream
(`pipeline.bench.overhead.ray_run`, `worker_main` plus the loop's timings): sum of the loop's waits for its
next batch / sum of step times, step 1 excluded, the larger of the two ranks.

`memory`: in a second in-process Ray with the object store capped at `--object-store-mb` (512 MiB), one
epoch of a 2.0 GB and of an 8.0 GB split (decoded; 10,240 and 40,960 of the 256-px JPEGs) through 2 Ray
Train workers (as ours above), after a short warm-up stream; the peak of the RSS summed over this process
and all its descendants (Ray's included), sampled every 0.1 s. Summed RSS counts pages shared between
processes (libraries, Ray's object store) once per process; the private part is reported too.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench import RESULTS_DIR, Options, Report, interleave, median

AE_STAGE: dict[str, Any] = {
    "kind": "autoencoder",
    "model": {"name": "kl_vae", "args": {"in_channels": 1, "base_channels": 32, "channel_mult": [1, 2],
                                         "num_res_blocks": 1, "latent_channels": 2}},
    "objective": {"beta": 1.0e-5},
}

PHOTO_SHARD = 256  # JPEGs per shard
PHOTO_INDEX = "bench-index.json"  # the photo set's shard list, written last (a build without it is unfinished)


# ---------------------------------------------------------------- datasets


def ensure_shards(image_size: int) -> Path:
    """Digits shards of `image_size` px under bench-results/data (built once)."""
    from pipeline.data import build_dataset

    d = (RESULTS_DIR / "data" / f"digits{image_size}").resolve()  # absolute: Ray Train workers run elsewhere
    if not (d / "manifest.json").is_file():
        build_dataset("digits", d, image_size=image_size, held_out=0.15, seed=0)
    return d


def _photo_crop(photos: list[np.ndarray], i: int, size: int, quality: int) -> tuple[dict[str, bytes], int]:
    """JPEG sample `i`: a random square crop (128 px up to the photo's shorter side) of a bundled photograph,
    resized to `size` x `size`; a function of `i` alone."""
    from PIL import Image

    from pipeline.data.sources import PHOTO_NAMES

    rng = np.random.default_rng([0x9407, i])
    label = int(rng.integers(len(photos)))
    photo = photos[label]
    h, w = photo.shape[:2]
    side = int(rng.integers(128, min(h, w) + 1))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    crop.save(buf, format="JPEG", quality=quality)
    caption = f"a crop of the {PHOTO_NAMES[label].replace('_', ' ')} photograph"
    return {"jpg": buf.getvalue(), "cls": str(label).encode(), "txt": caption.encode()}, label


def ensure_photos(n: int, size: int = 256, quality: int = 90) -> tuple[list[str], list[int]]:
    """At least `n` `size`-px JPEG samples in shards of PHOTO_SHARD under bench-results/data (built once, extended
    when more are asked for); returns (shard paths, samples per shard) of the first `n` (rounded up to shards).

    Written by `pipeline.data.shards`'s writer (plain ustar, members jpg/cls/txt). No manifest.json: its
    `encoding` field knows png and npy only; `PHOTO_INDEX` lists the shards instead.
    """
    from pipeline.data.shards import _ShardWriter
    from pipeline.data.sources import PHOTO_NAMES, _load_photo

    d = (RESULTS_DIR / "data" / f"photos{size}-jpeg").resolve()
    index = d / PHOTO_INDEX
    shards: list[dict[str, Any]] = json.loads(index.read_text())["shards"] if index.is_file() else []
    have = sum(s["num_samples"] for s in shards)
    if have < n:
        photos = [_load_photo(name) for name in PHOTO_NAMES]
        first = len(shards)

        class Writer(_ShardWriter):
            def _name(self) -> str:
                return f"{self.prefix}-{first + len(self.shards):06d}.tar"

        w = Writer(d, "train", PHOTO_SHARD)
        try:
            for i in range(have, -(-n // PHOTO_SHARD) * PHOTO_SHARD):
                members, label = _photo_crop(photos, i, size, quality)
                w.add(f"crop-{i:07d}", members, label)
            w.finish()
        except BaseException:
            w.abort()
            raise
        shards += [{"name": s.name, "num_samples": s.num_samples, "bytes": s.bytes} for s in w.shards]
        tmp = index.with_name(f".{index.name}.tmp")
        tmp.write_text(json.dumps({"size": size, "quality": quality, "shards": shards}, indent=1))
        os.replace(tmp, index)
    take, total = [], 0
    for s in shards:
        if total >= n:
            break
        take.append(s)
        total += s["num_samples"]
    return [str(d / s["name"]) for s in take], [s["num_samples"] for s in take]


def photo_spec(n: int, size: int = 256, *, seed: int = 0, shift: int = 1, hflip: bool = True) -> Any:
    """The stream of the first `n` photo samples (a `pipeline.data.stream.StreamSpec`)."""
    from pipeline.data.stream import StreamSpec

    paths, counts = ensure_photos(n, size)
    return StreamSpec(paths=tuple(paths), counts=tuple(counts), shape=(3, size, size), seed=seed, hflip=hflip,
                      shift=shift)


# ---------------------------------------------------------------- process-tree sampling


class TreeSampler:
    """A thread sampling, every `period` s, the CPU seconds of each process of this process's tree and the tree's
    summed RSS. CPU between two times is interpolated per process (a process counts from its start, and with its
    last reading after it exits), optionally over a subset of processes."""

    def __init__(self, period: float = 0.2) -> None:
        import psutil

        self.period = period
        self.me = psutil.Process()
        self.times: list[float] = []
        self.series: dict[int, tuple[list[float], list[float]]] = {}  # pid -> (times, CPU seconds)
        self.rss: list[float] = []
        self.anon: list[float] = []  # summed RSS less each process's shared pages (files, Ray's object store)
        self.peak: tuple[float, float, dict[int, int]] = (0.0, 0.0, {})  # (summed RSS, when, RSS per process)
        self.names: dict[int, str] = {}
        self.born: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            cpu: dict[int, float] = {}
            rss: dict[int, int] = {}
            anon = 0
            try:
                procs = [self.me, *self.me.children(recursive=True)]
            except psutil.Error:
                procs = [self.me]
            for p in procs:
                try:
                    with p.oneshot():
                        t = p.cpu_times()
                        cpu[p.pid] = t.user + t.system
                        m = p.memory_info()
                        rss[p.pid] = m.rss
                        anon += m.rss - getattr(m, "shared", 0)  # private memory: shared pages counted once below
                        self.names[p.pid] = " ".join(p.cmdline()[:1]) or p.name()  # Ray retitles its workers
                        self.born.setdefault(p.pid, p.create_time())
                except psutil.Error:
                    pass
            now = time.time()
            self.times.append(now)
            for pid, c in cpu.items():
                ts, cs = self.series.setdefault(pid, ([], []))
                ts.append(now)
                cs.append(c)
            self.rss.append(float(sum(rss.values())))
            self.anon.append(float(anon))
            if self.rss[-1] >= self.peak[0]:
                self.peak = (self.rss[-1], time.time(), rss)
            self._stop.wait(self.period)

    def mark(self) -> float:
        """Now, after one more sample has been taken (so an interval ending now is covered)."""
        n, now = len(self.times), time.time()
        while len(self.times) <= n and self._thread.is_alive():
            time.sleep(self.period / 4)
        return now

    def pids(self, t0: float, t1: float) -> set[int]:
        """Processes seen between t0 and t1."""
        return {p for p, (ts, _) in self.series.items() if ts[0] <= t1 + self.period and ts[-1] >= t0 - self.period}

    def cpu_at(self, t: float, pids: set[int] | None = None) -> float:
        """Summed CPU seconds of `pids` (default: every process seen) at time t, interpolated."""
        total = 0.0
        for pid in pids if pids is not None else list(self.series):
            if pid not in self.series:
                continue
            ts, cs = self.series[pid]
            n = min(len(ts), len(cs))  # the sampler thread may be appending
            ts, cs = ts[:n], cs[:n]
            born = self.born.get(pid, ts[0])
            xs, ys = ([born, *ts], [0.0, *cs]) if born < ts[0] else (ts, cs)
            total += float(np.interp(t, xs, ys))
        return total

    def cpu_between(self, t0: float, t1: float, pids: set[int] | None = None) -> float:
        return self.cpu_at(t1, pids) - self.cpu_at(t0, pids)

    def cpu_by_name(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds between t0 and t1 per kind of process (Ray's process titles)."""
        out: dict[str, float] = {}
        for pid in self.pids(t0, t1):
            name = self._kind(pid)
            out[name] = out.get(name, 0.0) + self.cpu_between(t0, t1, {pid})
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def reset_peak(self) -> None:
        self.peak = (0.0, 0.0, {})

    def peak_by_name(self) -> dict[str, float]:
        """RSS (bytes) per kind of process at the peak since `reset_peak`."""
        out: dict[str, float] = {}
        for pid, rss in self.peak[2].items():
            name = self._kind(pid)
            out[name] = out.get(name, 0.0) + rss
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def _kind(self, pid: int) -> str:
        name = self.names.get(pid, "?")
        return name.split("::", 1)[1].split("(")[0].split(".")[0] if "::" in name else Path(name.split()[0]).name

    def peak_rss(self, t0: float, t1: float, series: str = "rss") -> float:
        """Peak summed RSS (bytes; `series="anon"`: private memory only) between t0 and t1."""
        values = getattr(self, series)
        return max((r for t, r in zip(self.times, values, strict=True) if t0 <= t <= t1), default=float("nan"))


# ---------------------------------------------------------------- ours: worker_stream inside Ray Train workers


def init_ray(num_cpus: int, object_store_mb: int | None = None) -> None:
    """A fresh in-process Ray instance (never one another user started on this machine), token auth off."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        os.environ["RAY_AUTH_MODE"] = "disabled"  # nothing written to ~/.ray
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # as `pipeline run` starts Ray
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=object_store_mb * 2**20 if object_store_mb else None,
                 logging_config=ray.LoggingConfig(log_level="WARNING"),
                 runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu",
                                           "RAY_AUTH_MODE": "disabled"}})
    DataContext.get_current().enable_progress_bars = False
    from pipeline.stages import start_ray_data_stats_actor

    start_ray_data_stats_actor()  # as `pipeline run` starts Ray


def stream_worker(config: dict[str, Any]) -> None:
    """Ray Train function: iterate this rank's `worker_stream` for `batches` global batches, convert each with
    `batch_tensors`, and write when the batches came (wall clock) to `out/rank{r}.json`."""
    import ray.train as rt
    import torch

    from pipeline.data.ray_data import worker_stream
    from pipeline.train.loop import batch_tensors

    torch.set_num_threads(1)
    t_start = time.time()
    ctx = rt.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    micro = config["batch"] // world
    skipped: set[str] = set()
    n = n_first = 0
    t_first = float("nan")
    threads: dict[str, float] = {}
    stream = worker_stream(config["spec"], rank=rank, world=world, micro=micro, start=0, count=config["batches"])
    for i, (_, nb) in enumerate(stream):
        batch = batch_tensors(nb, skipped, rank)
        n += len(batch["image"])
        if i == 0:
            t_first, n_first, threads = time.time(), n, _thread_cpu()
        if i + 1 == config["batches"]:
            break
    threads = {k: v - threads.get(k, 0.0) for k, v in _thread_cpu().items()}  # from the first batch to the last
    stream.close()
    t_end = time.time()
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(
        {"t_start": t_start, "t_first": t_first, "t_end": t_end, "samples": n, "first_samples": n_first,
         "threads": dict(sorted(threads.items(), key=lambda kv: -kv[1]))}))
    rt.report({"samples": float(n)})


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads so far, by thread name (Linux; {} elsewhere)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    names = {t.native_id: t.name for t in threading.enumerate()}
    for task in Path("/proc/self/task").glob("*"):
        try:
            name = names.get(int(task.name)) or "native:" + (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def train_pass(spec: Any, *, batch: int, batches: int, workers: int, storage: str, sampler: TreeSampler
               ) -> dict[str, float]:
    """One Ray Train fit streaming `batches` global batches of `spec`; rates, CPU per sample, start-up."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # as `fit_stage` does
    out = Path(tempfile.mkdtemp(prefix="ranks-", dir=storage))
    trainer = TorchTrainer(
        stream_worker, train_loop_config={"spec": spec, "batch": batch, "batches": batches, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"bench-data-{time.time_ns()}", storage_path=storage),
        torch_config=TorchConfig(backend="gloo"))
    t0 = sampler.mark()
    result = trainer.fit()
    t1 = sampler.mark()
    error = result.error
    del result, trainer
    if error is not None:
        raise error
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(workers)]
    a, b = min(r["t_start"] for r in ranks), max(r["t_end"] for r in ranks)
    total = sum(r["samples"] for r in ranks)
    return {"samples": total, "rate": total / (b - a), "cpu_per_sample": sampler.cpu_between(a, b) / total,
            "whole_rate": total / (t1 - t0), "whole_cpu_per_sample": sampler.cpu_between(t0, t1) / total,
            "fit_to_worker_start_s": max(r["t_start"] for r in ranks) - t0,
            "fit_to_first_batch_s": max(r["t_first"] for r in ranks) - t0,
            "worker_start_to_first_batch_s": max(r["t_first"] - r["t_start"] for r in ranks),
            "peak_rss": sampler.peak_rss(t0, t1), "peak_anon": sampler.peak_rss(t0, t1, "anon"),
            "t0": t0, "t1": t1, "stream_t0": a, "stream_t1": b,
            "cpu_by_process": sampler.cpu_by_name(a, b),  # type: ignore[dict-item]
            "worker_threads": [r["threads"] for r in ranks]}  # type: ignore[dict-item]


# ---------------------------------------------------------------- webdataset's WebLoader on the same shards


def _wds_sample(raw: dict[str, Any], spec: Any) -> dict[str, Any]:
    """In a loader worker: what `read_batches` does per sample (decode, check, augment); epoch 0."""
    from pipeline.data.decode import check_decoded, decode_sample
    from pipeline.data.stream import augment_sample

    s = check_decoded(decode_sample(raw, uint8=True), raw["__url__"], spec.shape)
    s["image"] = augment_sample(s["image"], seed=spec.seed, epoch=0, key=s["key"], hflip=spec.hflip,
                                shift=spec.shift)
    return s


def _wds_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """In a loader worker: `read_batches`' columns; the image a uint8 tensor (it travels in shared memory)."""
    import torch

    n = len(samples)
    return {"image": torch.from_numpy(np.stack([s["image"] for s in samples])),
            "label": np.asarray([s["label"] for s in samples], np.int64),
            "caption": np.asarray([s.get("caption", "") for s in samples], dtype=object),
            "key": np.asarray([s["key"] for s in samples], dtype=object),
            "batch": np.zeros(n, np.int64), "epoch": np.zeros(n, np.int64), "ok": np.ones(n, bool)}


def wds_pass(spec: Any, *, epochs: int, batch: int, workers: int, sampler: TreeSampler) -> dict[str, float]:
    """One pass of webdataset's WebLoader over `epochs` copies of the spec's shards."""
    import functools

    import psutil
    import webdataset as wds

    from pipeline.train.loop import batch_tensors

    before = {p.pid for p in psutil.Process().children(recursive=True)}  # Ray's processes: not this contender's
    t0 = sampler.mark()
    urls = list(spec.paths) * epochs
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False, workersplitter=wds.split_by_worker)
          .map(functools.partial(_wds_sample, spec=spec)).batched(batch, collation_fn=_wds_collate, partial=True))
    loader = wds.WebLoader(ds, batch_size=None, num_workers=min(workers, len(urls)))
    skipped: set[str] = set()
    n = n_first = 0
    t_first = float("nan")
    for i, b in enumerate(loader):
        tensors = batch_tensors({**b, "image": b["image"].numpy()}, skipped)
        n += len(tensors["image"])
        if i == 0:
            t_first, n_first = time.time(), n
    t_end = time.time()
    del loader
    t1 = sampler.mark()
    pids = {p for p in sampler.pids(t0, t1) if p not in before}  # this process and its loader workers
    rate, cpu = n / (t_end - t0), sampler.cpu_between(t0, t_end, pids) / n
    return {"samples": n, "rate": rate, "cpu_per_sample": cpu, "whole_rate": rate, "whole_cpu_per_sample": cpu,
            "steady_rate": (n - n_first) / (t_end - t_first), "fit_to_first_batch_s": t_first - t0,
            "peak_rss": sampler.peak_rss(t0, t1), "cpu_by_process": sampler.cpu_by_name(t0, t_end)}


# ---------------------------------------------------------------- the parts of the benchmark


def throughput(kind: str, spec: Any, *, epochs: int, batch: int, workers: int, repeats: int, storage: str,
               sampler: TreeSampler) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
    """Interleaved passes of ours and WebLoader over `epochs` epochs of `spec`, after one untimed pass of each
    (returned too: ours' is the cold start of the Ray Train path when it is the first fit of the run)."""
    batches = epochs * spec.size // batch
    contenders = {
        f"ours ({kind})": lambda: train_pass(spec, batch=batch, batches=batches, workers=workers, storage=storage,
                                             sampler=sampler),
        f"webdataset ({kind})": lambda: wds_pass(spec, epochs=epochs, batch=batch, workers=workers,
                                                 sampler=sampler),
    }
    warm = {name: fn() for name, fn in contenders.items()}
    return interleave(contenders, repeats, warmup=0), warm


def wait_share(steps: int, batch: int, workers: int, storage: str) -> dict[str, Any]:
    """The autoencoder stage of jobs/ldm.yaml through Ray Train on the stream: the loop's data-wait share."""
    from pipeline.bench.overhead import ray_run

    r = ray_run(ensure_shards(16), steps, batch, workers, storage, shift=1)
    shares = [sum(t["wait_times"][1:]) / sum(t["step_times"][1:]) for t in r["ranks"]]
    waits = np.concatenate([t["wait_times"][1:] for t in r["ranks"]])
    return {"share": max(shares), "shares": shares, "median_step_s": median(r["ranks"][0]["step_times"][1:]),
            "median_wait_s": float(np.median(waits)), "max_wait_s": float(waits.max()),
            "fit_to_first_step_s": r["fit_to_first_step_s"], "fit_to_first_batch_s": r["fit_to_first_batch_s"],
            "steps": steps}


def memory(sizes: list[int], *, batch: int, workers: int, storage: str, sampler: TreeSampler
           ) -> list[dict[str, Any]]:
    """One epoch of each photo split size through Ray Train workers (after a short warm-up stream, so that every
    run finds the same Ray processes); the tree's peak RSS during each fit, by kind of process."""
    warm = photo_spec(min(sizes))
    train_pass(warm, batch=batch, batches=max(1, min(sizes) // (4 * batch)), workers=workers, storage=storage,
               sampler=sampler)
    out = []
    for n in sizes:
        spec = photo_spec(n, shift=1, hflip=True)
        time.sleep(2.0)
        idle = sampler.rss[-1]  # between fits: Ray's processes, no Train workers
        sampler.reset_peak()
        spilled = spilled_mib()
        r = train_pass(spec, batch=batch, batches=spec.size // batch, workers=workers, storage=storage,
                       sampler=sampler)
        decoded = spec.size * int(np.prod(spec.shape))
        out.append({"samples": spec.size, "decoded_bytes": decoded, "idle_rss": idle,
                    "spilled_mib": spilled_mib() - spilled, "peak_by_process": sampler.peak_by_name(), **r})
    return out


def spilled_mib() -> int:
    """MiB this Ray instance's object store has spilled to disk so far."""
    import re

    import ray
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Spilled (\d+) MiB", text)
    return int(m.group(1)) if m else 0


def run(opts: Options) -> Report:
    """The parts named by `--parts`: throughput (both kinds of data) and wait in one in-process Ray with the job's
    settings, then memory in another with the object store capped."""
    p = argparse.ArgumentParser(prog="pipeline bench data")
    p.add_argument("--parts", default="throughput,wait,memory",
                   help="comma-separated: throughput (both kinds of data), wait (training stage), memory")
    p.add_argument("--batch", type=int, default=64, help="global batch (per rank: batch / workers)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers and WebLoader workers")
    p.add_argument("--epochs", type=int, default=60, help="digits: epochs per pass (1,528 samples each)")
    p.add_argument("--photos", type=int, default=5120, help="photos: 256-px JPEGs in the throughput split")
    p.add_argument("--photo-epochs", type=int, default=4, help="photos: epochs per pass")
    p.add_argument("--steps", type=int, default=200, help="training steps for the data-wait share (the job's)")
    p.add_argument("--memory-sizes", default="10240,40960", help="photo split sizes of the memory part")
    p.add_argument("--ray-cpus", type=int, default=8, help="logical CPUs of in-process Ray (the job's)")
    p.add_argument("--object-store-mb", type=int, default=512, help="Ray's object store cap in the memory part")
    a = p.parse_args(opts.extra)
    repeats = opts.repeats or (1 if opts.quick else 3)
    if opts.quick:
        a.epochs, a.photos, a.photo_epochs, a.steps, a.memory_sizes = 2, 512, 1, 12, "512,2048"
    parts = {s.strip() for s in a.parts.split(",") if s.strip()}
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray
    import torch

    from pipeline.data.stream import spec_for

    torch.set_num_threads(1)
    digits = spec_for(str(ensure_shards(16)), "train", seed=0, shift=1)
    sizes = [int(s) for s in a.memory_sizes.split(",")]
    ensure_photos(max([a.photos, *(sizes if "memory" in parts else [])]))  # built once, before any timing
    photos = photo_spec(a.photos)
    storage = tempfile.mkdtemp(prefix="bench-data-")
    loads: dict[str, list[float]] = {}
    rows: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}
    detail: dict[str, Any] = {}
    notes: list[str] = []
    try:
        if parts & {"throughput", "wait"}:
            init_ray(a.ray_cpus)  # as `pipeline run` starts it for jobs/ldm.yaml (ray.num_cpus: 8)
            with TreeSampler(0.2) as sampler:
                if "throughput" in parts:
                    for kind, spec, epochs in (("digits 16 px PNG", digits, a.epochs),
                                               ("photos 256 px JPEG", photos, a.photo_epochs)):
                        tag = kind.split()[0]
                        loads[f"{tag} before"] = list(os.getloadavg())
                        res, warm = throughput(kind, spec, epochs=epochs, batch=a.batch, workers=a.workers,
                                               repeats=repeats, storage=storage, sampler=sampler)
                        loads[f"{tag} after"] = list(os.getloadavg())
                        detail[kind] = {"timed": res, "untimed": warm}
                        for name, rs in res.items():
                            rate = [r["rate"] for r in rs]
                            label = (f"ours: {a.workers} Ray Train workers, worker_stream" if name.startswith("ours")
                                     else f"webdataset WebLoader, {a.workers} workers")
                            rows.append({
                                "measurement": label, "data": kind, "samples/pass": rs[0]["samples"],
                                "samples/s (median)": median(rate), "min": min(rate), "max": max(rate),
                                "CPU ms/sample": 1e3 * median([r["cpu_per_sample"] for r in rs]),
                                "whole pass samples/s": median([r["whole_rate"] for r in rs]),
                                "whole pass CPU ms/sample": 1e3 * median([r["whole_cpu_per_sample"] for r in rs]),
                                "to first batch (s)": median([r["fit_to_first_batch_s"] for r in rs]),
                                "runs": len(rs), "load (1 min)": _load_range(loads, tag)})
                        (o, w) = res.values()
                        ratios[f"{tag}_ours_vs_webdataset_rate"] = (median([r["rate"] for r in o])
                                                                    / median([r["rate"] for r in w]))
                        ratios[f"{tag}_ours_vs_webdataset_cpu_per_sample"] = (
                            median([r["cpu_per_sample"] for r in o]) / median([r["cpu_per_sample"] for r in w]))
                        ratios[f"{tag}_fit_to_first_batch_s"] = median([r["fit_to_first_batch_s"] for r in o])
                        cold = warm[f"ours ({kind})"]
                        ratios.setdefault("cold_fit_to_first_batch_s", cold["fit_to_first_batch_s"])
                    notes.append(f"cold start (the run's first fit, untimed pass): fit() -> first batch "
                                 f"{ratios['cold_fit_to_first_batch_s']:.1f} s")
                if "wait" in parts:
                    loads["wait before"] = list(os.getloadavg())
                    ws = wait_share(a.steps, a.batch, a.workers, storage)
                    loads["wait after"] = list(os.getloadavg())
                    detail["wait"] = ws
                    rows.append({"measurement": f"autoencoder stage, jobs/ldm.yaml settings ({a.steps} steps)",
                                 "data": "digits 16 px PNG", "samples/pass": a.steps * a.batch,
                                 "samples/s (median)": a.batch / ws["median_step_s"],
                                 "to first batch (s)": ws["fit_to_first_batch_s"], "data-wait share": ws["share"],
                                 "runs": 1, "load (1 min)": _load_range(loads, "wait")})
                    ratios["stage_data_wait_share"] = ws["share"]
                    ratios["stage_fit_to_first_step_s"] = ws["fit_to_first_step_s"]
            gc.collect()  # no Ray object may outlive the instance it belongs to
            ray.shutdown()
        if "memory" in parts:
            init_ray(a.ray_cpus, a.object_store_mb)
            with TreeSampler(0.1) as sampler:
                loads["memory before"] = list(os.getloadavg())
                mem = memory(sizes, batch=a.batch, workers=a.workers, storage=storage, sampler=sampler)
                loads["memory after"] = list(os.getloadavg())
            detail["memory"] = mem
            for m in mem:
                rows.append({"measurement": f"memory: one epoch, {a.workers} Ray Train workers, object store "
                                            f"{a.object_store_mb} MiB",
                             "data": f"{m['samples']:,} photos, {m['decoded_bytes'] / 1e9:.2f} GB decoded",
                             "samples/pass": m["samples"], "samples/s (median)": m["rate"],
                             "CPU ms/sample": 1e3 * m["cpu_per_sample"],
                             "to first batch (s)": m["fit_to_first_batch_s"],
                             "peak tree RSS (GiB)": m["peak_rss"] / 2**30, "runs": 1,
                             "load (1 min)": _load_range(loads, "memory")})
            ratios["memory_peak_large_vs_small"] = mem[-1]["peak_rss"] / mem[0]["peak_rss"]
            ratios["memory_peak_gib"] = max(m["peak_rss"] for m in mem) / 2**30
            ratios["memory_peak_private_large_vs_small"] = mem[-1]["peak_anon"] / mem[0]["peak_anon"]
            notes.append("memory: spilled to disk " + ", ".join(f"{m['spilled_mib']}" for m in mem) + " MiB; "
                         "peak summed RSS per run (private only: "
                         + ", ".join(f"{m['peak_anon'] / 2**30:.2f}" for m in mem) + " GiB); idle tree between fits "
                         + ", ".join(f"{m['idle_rss'] / 2**30:.2f}" for m in mem) + " GiB")
            gc.collect()
            ray.shutdown()
    finally:
        if ray.is_initialized():
            gc.collect()
            ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
    goals = {"digits_ours_vs_webdataset_rate": ">= 1.0", "photos_ours_vs_webdataset_rate": ">= 1.0",
             "digits_ours_vs_webdataset_cpu_per_sample": "<= 1.5",
             "photos_ours_vs_webdataset_cpu_per_sample": "<= 1.5",
             "digits_fit_to_first_batch_s": "< 10", "photos_fit_to_first_batch_s": "< 10",
             "cold_fit_to_first_batch_s": "< 10", "stage_data_wait_share": "< 0.02",
             "memory_peak_large_vs_small": "0.9 .. 1.1",
             "memory_peak_gib": "< 8 (the large split alone is 7.5 GiB decoded)"}
    return Report(
        name="data", command="python -m pipeline.bench data",
        columns=["measurement", "data", "samples/pass", "samples/s (median)", "min", "max", "CPU ms/sample",
                 "whole pass samples/s", "whole pass CPU ms/sample", "to first batch (s)", "data-wait share",
                 "peak tree RSS (GiB)", "runs", "load (1 min)"],
        rows=rows, ratios=ratios, goals={k: v for k, v in goals.items() if k in ratios},
        notes=[f"batch {a.batch} ({a.workers} ranks x {a.batch // a.workers}); digits {digits.size} train samples x "
               f"{a.epochs} epochs per pass, photos {photos.size} x {a.photo_epochs}; WebLoader {a.workers} workers; "
               f"Ray {a.ray_cpus} logical CPUs",
               "samples/s and CPU ms/sample: from the start of the data path (ours: the Train workers' function; "
               "webdataset: the loader's creation) to its last batch; 'whole pass' from fit() for ours; CPU of the "
               "process tree, Ray's processes counted for ours only; to first batch: from fit() (ours, the later "
               "rank) or the loader's creation",
               "*_cpu_per_sample ratio: ours / webdataset (> 1: ours spends more CPU per sample)",
               "data-wait share: max over ranks of sum(waits) / sum(step times), steps 2..N", *notes],
        params=vars(a) | {"repeats": repeats, "loads": loads, "detail": detail})


def _load_range(loads: dict[str, list[float]], part: str) -> str:
    b, e = loads.get(f"{part} before"), loads.get(f"{part} after")
    return f"{b[0]:.1f} -> {e[0]:.1f}" if b and e else ""


__all__ = ["AE_STAGE", "TreeSampler", "ensure_photos", "ensure_shards", "init_ray", "run", "stream_worker",
           "train_pass", "wds_pass"]
