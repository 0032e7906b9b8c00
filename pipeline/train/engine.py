"""The DeepSpeed engine around a model: config from the spec, gloo on CPU, bf16 autocast on GPU."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def device_for(gpus_per_worker: float) -> torch.device:
    """The device a worker trains on; a GPU asked for where none exists is a clear error."""
    if gpus_per_worker > 0:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "the spec asks for GPUs (scale.gpus_per_worker > 0) but this machine has none; "
                "set scale.gpus_per_worker=0 to train on CPU"
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


def deepspeed_config(*, micro_batch: int, zero_stage: int, grad_clip: float) -> dict[str, Any]:
    """DeepSpeed config: ZeRO stage from the spec; precision is handled by autocast."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def make_engine(model: nn.Module, *, lr: float, weight_decay: float, warmup_steps: int,
                micro_batch: int, zero_stage: int, grad_clip: float, device: torch.device):
    """Wrap `model` in a DeepSpeed engine with AdamW and a linear warmup."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    import deepspeed

    ensure_process_group(device)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0
    )
    cfg = deepspeed_config(micro_batch=micro_batch, zero_stage=zero_stage, grad_clip=grad_clip)
    engine, _, _, _ = deepspeed.initialize(model=model.to(device), optimizer=opt, lr_scheduler=sched,
                                           config=cfg)
    return engine


def gathered_params(engine):
    """Context manager that makes ZeRO-3 partitioned parameters whole (no-op otherwise)."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()
