"""gpu: DiT-B/2 and DiT-XL/2 training throughput and MFU on one GPU, in one plain process (no Ray).

`python -m pipeline.bench.gpu --out DIR` (or `python -m pipeline.bench gpu -- --out DIR`). Measures, in
one process: the bf16 matmul peak (median of repeated 8192^3 products), then for each model size at
4x32x32 latents, 1000 classes, learned sigma, a full training step of

* ``ours``: our DiT, fp32 master weights + bf16 autocast, fused AdamW, grad-norm clipping at 1.0, EMA;
* ``ours+deepspeed-zN``: the same model and loss through `pipeline.train.engine.make_engine` (the
  engine the pipeline's loop uses), with the loop's step: ``engine.backward(loss); engine.step()``, EMA;
* ``ours+compile``: our DiT with every transformer block compiled (`torch.compile`, default mode;
  regional compilation: the blocks share one compiled graph, so XL/2 compiles one block, not 28);
* ``diffusers``: `diffusers.DiTTransformer2DModel` of the same size, eager and compiled likewise.

Every contender takes the pipeline's own loss: `DiffusionTask.loss` (label dropout 0.1, uniform t,
`diffusion_loss` with learned sigma and the hybrid L_simple + lambda*L_vlb objective of DiT, linear
schedule, 1000 steps). The schedule's tables are moved to the GPU once (as the pipeline builds it they
live on the CPU, and every `extract` copies them over: a stream synchronisation each; the number of
synchronisations per step is reported for both). FLOPs per training image are counted with
`torch.utils.flop_counter.FlopCounterMode` on forward + backward of the eager model; MFU is
img/s x FLOPs/img / measured peak. Peak memory is `torch.cuda.max_memory_allocated` over the
configuration. Results go to `OUT/gpu-bench.json` and `OUT/gpu-bench.md` after every configuration,
so a run cut short still leaves what it measured. `--quick` runs every code path on the CPU with
DiT-S/8 at batch 2 (a smoke test, not a measurement).

Imports nothing from Ray, MLflow or pydantic (`pipeline.data` is not imported).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: The public facebookresearch/DiT code on one GPU, 4x32x32 latents (from the issue; not measured here).
REFERENCE: list[dict[str, Any]] = [
    {"device": "H100 80GB (peak 742)", "model": "DiT-XL/2", "batch": 128, "config": "bf16 autocast, foreach AdamW",
     "img_s": 343, "mfu": None, "peak_gb": None},
    {"device": "H100 80GB (peak 742)", "model": "DiT-XL/2", "batch": 128, "config": "bf16 autocast, fused AdamW",
     "img_s": 353, "mfu": 0.34, "peak_gb": 57},
    {"device": "H100 80GB (peak 742)", "model": "DiT-XL/2", "batch": 128, "config": "+ torch.compile(model)",
     "img_s": 545, "mfu": 0.53, "peak_gb": 49},
    {"device": "H200 (peak 806)", "model": "DiT-XL/2", "batch": 128, "config": "bf16 autocast", "img_s": 384,
     "mfu": 0.34, "peak_gb": None},
    {"device": "H200 (peak 806)", "model": "DiT-B/2", "batch": 256, "config": "bf16 autocast", "img_s": 1604,
     "mfu": 0.28, "peak_gb": None},
]


@dataclass(frozen=True)
class Size:
    """One model size: our registry name, the diffusers equivalent and the batch it is timed at."""

    key: str
    ours: str
    batch: int
    heads: int
    head_dim: int
    depth: int
    patch: int


SIZES: dict[str, Size] = {
    "XL": Size("XL", "DiT-XL/2", 128, 16, 72, 28, 2),
    "B": Size("B", "DiT-B/2", 256, 12, 64, 12, 2),
}
QUICK_SIZE = Size("S", "DiT-S/8", 2, 6, 64, 12, 8)
NUM_CLASSES = 1000
LATENT = (4, 32, 32)
STAGE_DIFFUSION = {"schedule": "linear", "timesteps": 1000, "parameterization": "eps", "loss": "hybrid",
                   "lambda_vlb": 0.001, "learn_sigma": True, "label_dropout": 0.1}


# ----------------------------------------------------------------------------------------------- helpers
class Clock:
    """Elapsed seconds of a region of device work (CUDA events on GPU, a host clock on CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any], n: int) -> float:
        """Seconds for `n` calls of `fn` (device work included)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - t0


def _gib(n: float) -> float:
    return round(n / 2**30, 2)


def cleanup(device: torch.device) -> None:
    """Free what the last configuration left (models, optimizers, engines) before the next one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def matmul_peak(device: torch.device, n: int, repeats: int = 5) -> dict[str, Any]:
    """bf16 (fp32 on CPU) n x n x n product rate in TFLOP/s: median of `repeats` timed rounds."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)  # random data, never zeros
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    out = torch.empty(n, n, device=device, dtype=dtype)
    clock = Clock(device)

    def mm() -> None:
        torch.mm(a, b, out=out)

    for _ in range(3):
        mm()
    clock.sync()
    per = clock.time(mm, 1)
    reps = max(1, int(0.25 / max(per, 1e-6)))  # ~0.25 s per round
    rates = [2 * n**3 * reps / clock.time(mm, reps) / 1e12 for _ in range(repeats)]
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "tflops_median": statistics.median(rates),
            "tflops_all": [round(r, 1) for r in rates]}


def schedule_to(schedule: Any, device: torch.device) -> None:
    """Move a `Schedule`'s tables to `device` in place (it keeps them on the CPU; `extract` then copies)."""
    import dataclasses

    for f in dataclasses.fields(schedule):
        value = getattr(schedule, f.name)
        if torch.is_tensor(value):
            object.__setattr__(schedule, f.name, value.to(device))


def make_task(size: Size, device: torch.device, device_schedule: bool = True) -> Any:
    """The pipeline's `DiffusionTask` for `size` (DiT's hybrid objective with learned sigma)."""
    from pipeline.train.tasks import DiffusionTask

    stage = {"model": {"name": size.ours, "args": model_args(size)}, "diffusion": dict(STAGE_DIFFUSION)}
    task = DiffusionTask(stage, num_classes=NUM_CLASSES, data={})
    if device_schedule:
        schedule_to(task.schedule, device)
    return task


def model_args(size: Size) -> dict[str, Any]:
    return {"input_size": LATENT[1], "in_channels": LATENT[0], "num_classes": NUM_CLASSES, "learn_sigma": True}


class DiffusersDiT(nn.Module):
    """`diffusers.DiTTransformer2DModel` behind our DiT's call signature ``(x, t, y) -> (B, 2C, H, W)``."""

    def __init__(self, size: Size) -> None:
        super().__init__()
        from diffusers import DiTTransformer2DModel

        self.inner = DiTTransformer2DModel(
            num_attention_heads=size.heads, attention_head_dim=size.head_dim, in_channels=LATENT[0],
            out_channels=2 * LATENT[0], num_layers=size.depth, sample_size=LATENT[1], patch_size=size.patch,
            num_embeds_ada_norm=NUM_CLASSES)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner(x, timestep=t, class_labels=y, return_dict=False)[0]


def build(kind: str, size: Size, device: torch.device) -> nn.Module:
    """Our DiT (`kind="ours"`) or the diffusers one, fp32 weights, on `device`, in train mode."""
    torch.manual_seed(0)
    if kind == "ours":
        from pipeline.models import build_model

        model = build_model(size.ours, **model_args(size))
    else:
        model = DiffusersDiT(size)
    return model.to(device).train()


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks (what regional compilation compiles)."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "inner", inner)
    return inner.blocks if hasattr(inner, "blocks") else inner.transformer_blocks


def compile_blocks(model: nn.Module) -> None:
    """Compile every transformer block in place (default mode); identical blocks share one graph."""
    for block in blocks_of(model):
        block.compile()


def param_counts(size: Size) -> dict[str, Any]:
    """Parameters of ours and of diffusers at `size` (meta device). diffusers gives every block its own
    timestep + label embedder; counted once, it has exactly our parameter count."""
    from pipeline.models.dit import dit_param_count

    ours = dit_param_count(size.ours, **model_args(size))
    with torch.device("meta"):
        theirs = DiffusersDiT(size)
    total = sum(p.numel() for p in theirs.parameters())
    per_block_emb = sum(p.numel() for n, p in theirs.named_parameters() if ".norm1.emb." in n)
    shared = total - per_block_emb * (size.depth - 1) // size.depth
    return {"ours": ours, "diffusers": total, "diffusers_ratio": round(total / ours, 4),
            "diffusers_embedders_counted_once": shared, "ratio_embedders_once": round(shared / ours, 4)}


def make_batch(size: Size, device: torch.device, batch: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(1)
    b = batch or size.batch
    return {"image": torch.randn(b, *LATENT, device=device, generator=g),
            "label": torch.randint(0, NUM_CLASSES, (b,), device=device, generator=g)}


def count_flops(model: nn.Module, task: Any, device: torch.device, precision: str, size: Size) -> float:
    """FLOPs of one training image (forward + backward, loss included) by `FlopCounterMode`, at batch 2."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.train.engine import autocast

    batch = make_batch(size, device, batch=2)
    gen = torch.Generator(device=device).manual_seed(2)
    with FlopCounterMode(display=False) as counter:
        with autocast(precision, device):
            loss, _ = task.loss(model, batch, gen)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def count_syncs(step: Callable[[], None], device: torch.device) -> int | None:
    """Host-device synchronisations in one call of `step` (CUDA sync debug mode); None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


# ------------------------------------------------------------------------------------------------ steps
class Contender:
    """One configuration: a training-step callable plus what it needs to be measured."""

    def __init__(self, name: str, size: Size, model_kind: str, engine: str, compiled: bool,
                 precision: str, device: torch.device) -> None:
        self.name, self.size, self.model_kind, self.engine = name, size, model_kind, engine
        self.compiled, self.precision, self.device = compiled, precision, device
        self.step: Callable[[], None] | None = None
        self.out_dtype: str | None = None
        self.objects: list[Any] = []

    def setup(self, task: Any) -> nn.Module:
        """Build the model and its optimizer (or engine); returns the eager module (for FLOP counting)."""
        from pipeline.train.ema import EMA
        from pipeline.train.engine import autocast, engine_step, gathered_params, make_engine

        device, size, precision = self.device, self.size, self.precision
        model = build(self.model_kind, size, device)
        batch = make_batch(size, device)
        gen = torch.Generator(device=device).manual_seed(3)
        counter = {"step": 0}
        cuda = device.type == "cuda"

        def record_dtype(_mod: nn.Module, _inp: Any, out: Any) -> None:
            t = out[0] if isinstance(out, tuple) else out
            self.out_dtype = str(t.dtype).replace("torch.", "")

        model.register_forward_hook(record_dtype)
        if self.compiled:
            compile_blocks(model)
        if self.engine == "plain":
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=cuda, foreach=None if cuda else True)
            ema = EMA(model, 0.9999)

            def step() -> None:
                with autocast(precision, device):
                    loss, _ = task.loss(model, batch, gen)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
                opt.step()
                opt.zero_grad(set_to_none=True)
                ema.update(model, counter["step"])
                counter["step"] += 1

            self.objects = [model, opt, ema]
        else:  # "ds0", "ds1", "ds2", optionally suffixed "-noautocast" (the config before the fix);
            # "dsdefault": what the training loop uses for the spec's default zero_stage=1 on one worker
            from pipeline.train.engine import effective_zero_stage

            stage = effective_zero_stage(1, 1, device) if self.engine == "dsdefault" else int(self.engine[2])
            engine_precision = "fp32" if self.engine.endswith("-noautocast") else precision
            engine = make_engine(model, lr=1e-4, weight_decay=0.0, warmup_steps=0, micro_batch=size.batch,
                                 zero_stage=stage, grad_clip=1.0, device=device, precision=engine_precision)
            with gathered_params(engine):
                ema = EMA(engine.module, 0.9999)

            def step() -> None:  # the loop's step, without its per-step host reads of the loss
                with autocast(precision, device):
                    loss, _ = task.loss(engine, batch, gen)
                engine.backward(loss)
                engine_step(engine, 1.0)
                with gathered_params(engine):
                    ema.update(engine.module, counter["step"])
                counter["step"] += 1

            self.objects = [engine, model, ema]
        self.step = step
        return model

    def teardown(self) -> None:
        for obj in self.objects:
            destroy = getattr(obj, "destroy", None)
            if callable(destroy) and hasattr(obj, "zero_optimization_stage"):
                with contextlib.suppress(Exception):
                    destroy()
        self.objects = []
        self.step = None


def time_contender(c: Contender, warmup: int, seconds: float, rounds: int) -> dict[str, Any]:
    """Warm up, then `rounds` timed rounds of ~seconds/rounds each; img/s per round and the median."""
    assert c.step is not None
    clock = Clock(c.device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        c.step()
    clock.sync()
    warm_s = time.perf_counter() - t0
    per = clock.time(c.step, 1)
    n = max(1, round(seconds / rounds / max(per, 1e-6)))
    rates = [n * c.size.batch / clock.time(c.step, n) for _ in range(rounds)]
    return {"warmup_s": round(warm_s, 1), "steps_per_round": n, "img_s_all": [round(r, 1) for r in rates],
            "img_s": statistics.median(rates)}


def profile_step(c: Contender) -> dict[str, Any]:
    """Device time of one step by kernel category (torch.profiler), against the step's wall time."""
    from torch.profiler import ProfilerActivity, profile

    assert c.step is not None
    cuda = c.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    Clock(c.device).sync()
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        c.step()
        Clock(c.device).sync()
    wall = time.perf_counter() - t0
    cats = {"matmul": ("gemm", "xmma", "cutlass", "nvjet", "wgmma", "sm90_", "matmul", "addmm", "mm"),
            "attention": ("flash", "fmha", "attention", "cudnn", "sdpa", "attn"),
            "norm": ("layer_norm", "layernorm"),
            "optimizer+ema+clip": ("adam", "multi_tensor", "foreach", "lerp", "norm_kernel"),
            }
    out: dict[str, float] = {}
    total = 0.0
    for evt in prof.key_averages():
        if cuda:
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            dev_us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)
        else:  # CPU smoke test: self times of the aten ops
            dev_us = evt.self_cpu_time_total if evt.key.startswith("aten::") else 0.0
        if not dev_us:
            continue
        name = evt.key.lower()
        cat = next((k for k, pats in cats.items() if any(p in name for p in pats)), "elementwise/other")
        out[cat] = out.get(cat, 0.0) + dev_us / 1e3
        total += dev_us / 1e3
    top = sorted(((e.key[:90], round(getattr(e, "self_device_time_total", 0.0) / 1e3, 2))
                  for e in prof.key_averages() if cuda and e.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda kv: -kv[1])[:12]
    return {"wall_ms": round(wall * 1e3, 1), "device_busy_ms": round(total, 1),
            "by_category_ms": {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": top}


def attention_bench(device: torch.device, size: Size, clock: Clock) -> dict[str, Any]:
    """Forward + backward of SDPA at the model's shape, default choice vs each backend forced."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    f = torch.nn.functional.scaled_dot_product_attention
    tokens = (LATENT[1] // size.patch) ** 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = (size.batch, size.heads, tokens, size.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    flops = 4 * size.batch * size.heads * tokens**2 * size.head_dim * 3.5  # fwd 2 matmuls, bwd 2.5x
    res: dict[str, Any] = {"shape": list(shape)}
    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    for name, be in backends.items():
        ctx = sdpa_kernel([be]) if be is not None else contextlib.nullcontext()
        try:
            with ctx:
                def run() -> None:
                    f(q, k, v).sum().backward()

                for _ in range(2):
                    run()
                sec = statistics.median(clock.time(run, 5) / 5 for _ in range(3))
            res[name] = {"ms": round(sec * 1e3, 3), "tflops": round(flops / sec / 1e12, 1)}
        except Exception as e:  # backend not available for this shape / dtype
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
    return res


def optimizer_bench(device: torch.device, size: Size, clock: Clock) -> dict[str, Any]:
    """Seconds of the non-model part of a step at `size`: AdamW (fused vs foreach), clipping, EMA."""
    from pipeline.train.ema import EMA

    model = build("ours", size, device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    res: dict[str, Any] = {}
    variants = {"fused": {"fused": True}, "foreach": {"foreach": True}} if device.type == "cuda" else \
        {"foreach": {"foreach": True}}
    for name, kw in variants.items():
        opt = torch.optim.AdamW(params, lr=1e-4, **kw)
        opt.step()
        res[f"adamw_{name}_ms"] = round(clock.time(opt.step, 5) / 5 * 1e3, 2)
        del opt
        gc.collect()
    res["clip_grad_norm_ms"] = round(clock.time(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0), 5) / 5 * 1e3, 2)
    ema = EMA(model, 0.9999)
    res["ema_update_ms"] = round(clock.time(lambda: ema.update(model, 100), 5) / 5 * 1e3, 2)
    return res


# ------------------------------------------------------------------------------------------------ report
def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown: the main table, then peak, parameters, profiles and notes."""
    lines = [f"# GPU benchmark: {result['device']}", "",
             f"{result['date']}, torch {result['torch']}, peak bf16 matmul "
             f"{result.get('peak', {}).get('tflops_median', float('nan')):.0f} TFLOP/s "
             f"(n={result.get('peak', {}).get('n')}), {result['elapsed_s']:.0f} s", "",
             "| model | batch | config | precision | img/s | MFU | peak mem (GiB) | GFLOP/img | syncs/step | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        img = f"{r['img_s']:,.1f}" if r.get("img_s") else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        mem = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        gfl = f"{r['flops_per_img'] / 1e9:.0f}" if r.get("flops_per_img") else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['config']} | {r['precision']} | {img} | {mfu} | {mem} | "
                     f"{gfl} | {r.get('syncs', '-')} | {r.get('note', '')} |")
    lines += ["", "Reference (public DiT code, from the issue, not measured here):", "",
              "| device | model | batch | config | img/s | MFU | peak GB |", "|---|---|---|---|---|---|---|"]
    for r in REFERENCE:
        ref_mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.0f}%"
        lines.append(f"| {r['device']} | {r['model']} | {r['batch']} | {r['config']} | {r['img_s']} | "
                     f"{ref_mfu} | {r['peak_gb'] or ''} |")
    for key in ("params", "attention", "optimizer", "profiles", "syncs_cpu_schedule", "errors"):
        if result.get(key):
            lines += ["", f"## {key}", "", "```", json.dumps(result[key], indent=1), "```"]
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out: Path, t0: float) -> None:
    result["elapsed_s"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-bench.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "gpu-bench.md").write_text(markdown(result))


# -------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "bench-results/gpu", help="output folder")
    p.add_argument("--quick", "--cpu-smoke", action="store_true", dest="quick",
                   help="CPU smoke test: DiT-S/8, batch 2, every code path (not a measurement)")
    p.add_argument("--budget", type=float, default=270.0, help="seconds; configurations that would not fit are "
                   "skipped (default 270)")
    p.add_argument("--seconds", type=float, default=2.4, help="timed seconds per configuration (default 2.4)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per configuration; the median is reported")
    p.add_argument("--sizes", default="XL,B", help="comma-separated: XL, B (default XL,B)")
    p.add_argument("--only", default="", help="comma-separated substrings (or =LABEL for an exact label such as "
                   "'=DiT-XL/2 ours'): run only matching configurations")
    p.add_argument("--no-profile", action="store_true", help="skip the per-kernel-category profiles")
    p.add_argument("--no-micro", action="store_true", help="skip the attention / optimizer microbenchmarks")
    return p


def plan(sizes: list[Size], quick: bool) -> list[tuple[Size, str, str, str, bool, float]]:
    """(size, name, model kind, engine, compiled, estimated seconds) in priority order."""
    by = {s.key: s for s in sizes}
    xl, b = by.get("XL"), by.get("B")
    s = sizes[0] if quick else None
    items: list[tuple[Size, str, str, str, bool, float]] = []

    def add(size: Size | None, name: str, kind: str, engine: str, compiled: bool, est: float) -> None:
        if size is not None:
            items.append((size, name, kind, engine, compiled, est))

    if quick:
        for name, kind, engine, comp in [("ours", "ours", "plain", False), ("ours+deepspeed-z1", "ours", "ds1", False),
                                         ("ours+deepspeed-z1 (before fix)", "ours", "ds1-noautocast", False),
                                         ("ours+deepspeed-z2", "ours", "ds2", False),
                                         ("ours+deepspeed-z0", "ours", "ds0", False),
                                         ("diffusers", "diffusers", "plain", False),
                                         ("ours+compile", "ours", "plain", True),
                                         ("diffusers+compile", "diffusers", "plain", True)]:
            add(s, name, kind, engine, comp, 5.0)
        return items
    add(xl, "ours", "ours", "plain", False, 15)
    add(xl, "ours+deepspeed-z1", "ours", "ds1", False, 15)
    add(xl, "ours+deepspeed-z1 (before fix)", "ours", "ds1-noautocast", False, 10)
    add(xl, "diffusers", "diffusers", "plain", False, 15)
    add(b, "ours", "ours", "plain", False, 7)
    add(b, "ours+deepspeed-z1", "ours", "ds1", False, 7)
    add(b, "diffusers", "diffusers", "plain", False, 7)
    add(xl, "ours+deepspeed-z2", "ours", "ds2", False, 15)
    add(xl, "ours+deepspeed-z0", "ours", "ds0", False, 15)
    add(xl, "ours+compile", "ours", "plain", True, 30)
    add(xl, "diffusers+compile", "diffusers", "plain", True, 35)
    add(b, "ours+compile", "ours", "plain", True, 17)
    add(b, "diffusers+compile", "diffusers", "plain", True, 20)
    add(xl, "ours+compile+deepspeed-z1", "ours", "ds1", True, 12)
    add(xl, "ours+deepspeed (pipeline default, one worker)", "ours", "dsdefault", False, 15)
    add(xl, "ours+compile+deepspeed (pipeline default, one worker)", "ours", "dsdefault", True, 12)
    add(b, "ours+deepspeed (pipeline default, one worker)", "ours", "dsdefault", False, 7)
    add(b, "ours+compile+deepspeed (pipeline default, one worker)", "ours", "dsdefault", True, 10)
    return items


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 (also when some configurations failed: they are reported)."""
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    precision = "bf16"
    clock = Clock(device)
    sizes = [QUICK_SIZE] if args.quick else [SIZES[k.strip()] for k in args.sizes.split(",") if k.strip()]
    if not cuda and not args.quick:
        print("pipeline bench gpu: no CUDA device; use --quick for the CPU smoke test", file=sys.stderr)
        return 1
    if args.quick:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "torch": torch.__version__,
        "python": platform.python_version(), "quick": args.quick, "latent": list(LATENT),
        "objective": "DiffusionTask.loss: eps-prediction, learned sigma, hybrid L_simple + 0.001*L_vlb, linear "
                     "schedule, label dropout 0.1; step = loss, backward, clip 1.0, AdamW, EMA",
        "rows": [], "errors": [], "params": {}, "profiles": {}, "optimizer": {}, "attention": {},
    }
    with contextlib.suppress(Exception):
        import deepspeed

        result["deepspeed"] = deepspeed.__version__
    with contextlib.suppress(Exception):
        import diffusers

        result["diffusers"] = diffusers.__version__
    if cuda:
        result["gpu_memory_gib"] = _gib(torch.cuda.get_device_properties(0).total_memory)
    result["peak"] = matmul_peak(device, 8192 if cuda else 512, repeats=5 if cuda else 2)
    peak = result["peak"]["tflops_median"] * 1e12
    print(f"peak {result['peak']}", flush=True)
    write(result, out, t0)

    flops: dict[tuple[str, str], float] = {}
    for size in sizes:
        with contextlib.suppress(Exception):
            result["params"][size.ours] = param_counts(size)
    only = [o.strip() for o in args.only.split(",") if o.strip()]
    profiled: set[str] = set()
    for size, name, kind, engine, compiled, est in plan(sizes, args.quick):
        label = f"{size.ours} {name}"
        if only and not any(label == o[1:] if o.startswith("=") else o in label for o in only):
            continue
        row: dict[str, Any] = {"model": size.ours, "batch": size.batch, "config": name, "precision":
                               "fp32 weights + bf16 autocast"}
        if time.perf_counter() - t0 + est > args.budget:
            row["note"] = "skipped: time budget"
            result["rows"].append(row)
            write(result, out, t0)
            continue
        cleanup(device)
        base = torch.cuda.memory_allocated() if cuda else 0
        task = make_task(size, device)
        c = Contender(name, size, kind, engine, compiled, precision, device)
        failure: str | None = None
        eager: nn.Module | None = None
        saved: Callable[[], None] | None = None
        try:
            t_cfg = time.perf_counter()
            eager = c.setup(task)
            if (kind, size.key) not in flops and not compiled:
                flops[(kind, size.key)] = count_flops(eager, task, device, precision, size)
            if cuda and "syncs_cpu_schedule" not in result and engine == "plain" and not compiled:
                cpu_task = make_task(size, device, device_schedule=False)
                saved = c.step
                c.step = None
                result["syncs_cpu_schedule"] = {"config": label, "syncs_per_step": count_syncs(
                    lambda: _step_with_task(saved, task, cpu_task), device)}  # noqa: B023 (called here)
                c.step = saved
            timing = time_contender(c, warmup=1 if engine.endswith("noautocast") else 3, seconds=args.seconds,
                                    rounds=2 if engine.endswith("noautocast") else max(1, args.repeats))
            row.update(timing)
            row["syncs"] = count_syncs(c.step, device)
            if cuda:
                row["peak_gib"] = _gib(torch.cuda.max_memory_allocated() - base)
                row["held_after_gib"] = _gib(torch.cuda.memory_allocated() - base)
            fl = flops.get((kind, size.key))
            if fl:
                row["flops_per_img"] = fl
                row["mfu"] = row["img_s"] * fl / peak
            row["model_output_dtype"] = c.out_dtype
            if engine.endswith("noautocast"):
                row["note"] = f"config before the fix: model ran in {c.out_dtype}"
            row["seconds"] = round(time.perf_counter() - t_cfg, 1)
            key = f"{size.ours} {'compiled' if compiled else 'eager'} {engine}"
            if (engine == "plain" or args.quick) and key not in profiled and kind == "ours" and not args.no_profile \
                    and time.perf_counter() - t0 + est + 5 < args.budget:
                result["profiles"][key] = profile_step(c)
                profiled.add(key)
        except torch.OutOfMemoryError as e:
            failure = f"out of memory: {str(e).splitlines()[0][:160]}"
            row["peak_gib"] = _gib(torch.cuda.max_memory_allocated() - base) if cuda else None
        except Exception as e:  # a failed configuration is reported, the others still run
            failure = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        if failure:
            row["note"] = (row.get("note", "") + " " + failure).strip()
            result["errors"].append({"config": label, "error": failure})
        c.teardown()
        eager = saved = c = task = None  # nothing of this configuration may stay alive into the next one
        result["rows"].append(row)
        print(f"{label}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("model", "config")), flush=True)
        write(result, out, t0)

    cleanup(device)
    for size in sizes:  # cheap microbenchmarks last: what bounds the step
        if args.no_micro or time.perf_counter() - t0 + 6 > args.budget:
            break
        try:
            result["attention"][size.ours] = attention_bench(device, size, clock)
            cleanup(device)
            result["optimizer"][size.ours] = optimizer_bench(device, size, clock)
        except Exception as e:
            result["errors"].append({"config": f"{size.ours} microbenchmarks", "error": f"{type(e).__name__}: {e}"})
        cleanup(device)
        write(result, out, t0)
    write(result, out, t0)
    print(markdown(result), flush=True)
    return 0


def _step_with_task(step: Callable[[], None] | None, task: Any, cpu_task: Any) -> None:
    """Run `step` once with the schedule tables on the CPU, as the pipeline builds them."""
    assert step is not None
    device_schedule = task.schedule
    task.schedule = cpu_task.schedule
    try:
        step()
    finally:
        task.schedule = device_schedule


if __name__ == "__main__":
    sys.exit(main())
