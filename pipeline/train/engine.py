"""The DeepSpeed engine around a model: config from the spec, gloo on CPU, bf16 autocast on GPU."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def device_for(gpus_per_worker: float) -> torch.device:
    """The device a worker trains on; a GPU asked for where none exists is a clear error."""
    if gpus_per_worker > 0:
        if not torch.cuda.is_available():
            from pipeline.config import ClusterError

            raise ClusterError(
                f"the spec asks for GPUs (scale.gpus_per_worker={gpus_per_worker:g}) but this worker's machine "
                f"({socket.gethostname()}) has none that torch can use; set scale.gpus_per_worker=0 to train on CPU"
            )
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` means bf16 on GPU and fp32 on CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast (weights stay fp32, so timestep features and norms stay accurate)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group(device: torch.device) -> None:
    """A one-process group for the plain (no Ray) path; Ray Train sets up its own."""
    if dist.is_available() and dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)


def load_comm_op() -> None:
    """Load DeepSpeed's CPU shared-memory collective op, first clearing a build lock left by a dead process.

    torch guards an extension's JIT build directory with a plain `lock` file that every loading
    process takes, even when the build is up to date. A process killed while holding it (a
    preempted or killed training worker) leaves it behind, and every later process on the machine
    then waits for it forever: CI lost four tests to their 20-minute limit that way. So each process
    first takes an flock on a file beside the build directory (the kernel frees it when its holder
    dies); holding it, any `lock` file is a dead process's and is removed. The op is then cached in
    the process, so DeepSpeed's own load in `deepspeed.initialize` does not take the lock again.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # not a CPU worker: DeepSpeed loads no such op
    build = Path(_get_build_directory(builder.name, verbose=False))
    with open(build.parent / f".{build.name}.pipeline-lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released when this file closes or this process dies
        stale = build / "lock"
        if stale.exists():
            logging.getLogger(__name__).warning("removing %s, a build lock left by a killed process", stale)
            stale.unlink(missing_ok=True)
        builder.load(verbose=False)


def effective_zero_stage(zero_stage: int, world_size: int, device: torch.device) -> int:
    """The ZeRO stage a worker actually uses: 0 for stages 1–2 on a single GPU worker.

    ZeRO-1/2 partition optimizer state and gradients across workers; with one worker they partition
    nothing, but DeepSpeed still copies every gradient and weight through its flat fp32 partition each
    step and adds host-device syncs: 5–7% slower than the plain loop on an H100, where ZeRO-0 is 3%
    (docs/gpu-bench.md). On CPU the spec's stage is kept (the sharded code paths stay exercised there).
    """
    if world_size == 1 and device.type == "cuda" and zero_stage in (1, 2):
        return 0
    return zero_stage


def deepspeed_config(*, micro_batch: int, zero_stage: int, grad_clip: float,
                     precision: str = "fp32") -> dict[str, Any]:
    """DeepSpeed config: ZeRO stage from the spec; precision is handled by torch autocast.

    With `precision="bf16"` the config declares DeepSpeed's `torch_autocast` section. Without it,
    DeepSpeed's `engine.forward` switches an autocast entered by the caller *off* around the model
    (`deepspeed.runtime.torch_autocast.autocast_if_enabled`), so the model silently ran in fp32:
    twice the activation memory of the plain loop (out of memory for DiT-XL/2 at batch 128 on 80 GB)
    and fp32 matmuls. `lower_precision_safe_modules: []` keeps gradients reduced in fp32, as before
    (DeepSpeed's default would all-reduce Linear/Conv gradients in bf16). Weights stay fp32.
    """
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        # ZeRO-0: `engine_step` clips with torch's fused foreach clip instead (see there)
        "gradient_clipping": grad_clip if zero_stage > 0 else 0.0,
        # 5e7-element buckets (DeepSpeed's default 5e8 is a 1.9 GiB fp32 buffer: out of memory for
        # DiT-XL/2 at batch 128 on 80 GB under ZeRO-1/2, where the plain loop fits).
        "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": 50_000_000,
                              "allgather_bucket_size": 50_000_000},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return cfg


def make_engine(model: nn.Module, *, lr: float, weight_decay: float, warmup_steps: int,
                micro_batch: int, zero_stage: int, grad_clip: float, device: torch.device,
                precision: str = "auto"):
    """Wrap `model` in a DeepSpeed engine with AdamW and a linear warmup.

    `precision` must match the autocast the caller trains under (`resolve_precision`: "auto" is bf16
    on GPU, fp32 on CPU), since DeepSpeed applies its own autocast setting inside `engine(...)`.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    import deepspeed

    ensure_process_group(device)
    load_comm_op()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0
    )
    cfg = deepspeed_config(micro_batch=micro_batch, zero_stage=zero_stage, grad_clip=grad_clip,
                           precision=resolve_precision(precision, device))
    engine, _, _, _ = deepspeed.initialize(model=model.to(device), optimizer=opt, lr_scheduler=sched,
                                           config=cfg)
    return engine


def engine_step(engine, grad_clip: float) -> None:
    """Clip the gradients to global norm `grad_clip` and take the optimizer step.

    Under ZeRO-1–3 DeepSpeed clips its own flat partitions. Under ZeRO-0 the gradients are whole
    (already all-reduced by `engine.backward`) and are clipped here with torch's fused foreach clip:
    DeepSpeed's stage-0 clip launches a norm and a scale kernel per parameter and copies host scalars
    to the device every step. The result is the same: g · min(1, clip / (‖g‖ + 1e-6)).
    """
    if grad_clip > 0 and engine.zero_optimization_stage() == 0:
        params = [p for p in engine.module.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    engine.step()


def gathered_params(engine):
    """Context manager that makes ZeRO-3 partitioned parameters whole (no-op otherwise)."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- topology-free training state


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that holds Adam's moments (over flat partitions under ZeRO)."""
    opt = engine.optimizer
    return opt.optimizer if engine.zero_optimization_stage() > 0 else opt


def full_state(engine) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every parameter's fp32 weight and Adam moments, whole, plus the optimizer step and scheduler state.

    A collective under ZeRO (each rank holds a partition): every rank must call it. The result does
    not depend on the ZeRO stage or the number of workers, so it loads into any other topology.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    stage = engine.zero_optimization_stage()
    base = _base_optimizer(engine)
    tensors: dict[str, torch.Tensor] = {}
    opt_step = 0.0
    for name, p in engine.module.named_parameters():
        if stage == 0:
            st = base.state.get(p, {})
            w, m, v = p.detach(), st.get("exp_avg"), st.get("exp_avg_sq")
        else:
            w = safe_get_full_fp32_param(p)
            m = safe_get_full_optimizer_state(p, "exp_avg")
            v = safe_get_full_optimizer_state(p, "exp_avg_sq")
        tensors[f"param/{name}"] = w.detach().float().cpu().clone()
        if m is not None and v is not None:
            tensors[f"exp_avg/{name}"] = m.detach().float().cpu().clone()
            tensors[f"exp_avg_sq/{name}"] = v.detach().float().cpu().clone()
    persistent = set(engine.module.state_dict().keys())  # not e.g. DiT's fixed pos_embed, which the model rebuilds
    for name, b in engine.module.named_buffers():
        if name in persistent:
            tensors[f"buffer/{name}"] = b.detach().cpu().clone()
    for st in base.state.values():
        if "step" in st:
            opt_step = float(st["step"])
            break
    sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    return tensors, {"optimizer_step": opt_step, "scheduler": sched}


def load_module_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load the weights of a `full_state` into a plain module (before DeepSpeed partitions it)."""
    state = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(("param/", "buffer/"))}
    model.load_state_dict(state, strict=True)


def load_optimizer_state(engine, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Put the weights, Adam moments, step and LR schedule of a `full_state` into `engine` (any ZeRO stage)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    stage = engine.zero_optimization_stage()
    base = _base_optimizer(engine)
    step = float(meta["optimizer_step"])
    for group in base.param_groups:  # torch creates Adam's state lazily, at the first step
        for p in group["params"]:
            st = base.state[p]
            st.setdefault("step", torch.tensor(step))
            st.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
            st.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))
            st["step"].fill_(step)
    if stage in (1, 2) and hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._lazy_init_hp_params_optimizer_state()  # link the moments to each parameter
    for name, p in engine.module.named_parameters():
        w = tensors[f"param/{name}"].to(p.device)
        m, v = tensors.get(f"exp_avg/{name}"), tensors.get(f"exp_avg_sq/{name}")
        if stage == 0:
            with torch.no_grad():
                p.copy_(w)
            if m is not None:
                base.state[p]["exp_avg"].copy_(m)
                base.state[p]["exp_avg_sq"].copy_(v)
            continue
        safe_set_full_fp32_param(p, w)
        if m is not None:
            safe_set_full_optimizer_state(p, m.to(p.device), "exp_avg")
            safe_set_full_optimizer_state(p, v.to(p.device), "exp_avg_sq")
    if meta.get("scheduler") is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(dict(meta["scheduler"]))
        for group, lr in zip(base.param_groups, meta["scheduler"]["_last_lr"], strict=True):
            group["lr"] = lr
