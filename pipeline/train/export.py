"""Exported weights: safetensors plus a small JSON that says how to rebuild the module.

Nothing here unpickles: weights are safetensors, metadata is JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "model.safetensors"
META = "model.json"


def export_weights(state: dict[str, torch.Tensor], model_name: str, model_args: dict[str, Any],
                   out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `state` and its rebuild recipe into `out_dir` (atomically, file by file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    tmp = out / f".{WEIGHTS}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp))
    os.replace(tmp, out / WEIGHTS)
    meta = {"name": model_name, "args": model_args, "extra": extra or {}}
    tmp = out / f".{META}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, out / META)
    return out


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    """The rebuild recipe and extras stored beside exported weights."""
    return json.loads((Path(model_dir) / META).read_text())


def load_exported(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the module from its recipe and load the safetensors weights (eval mode)."""
    from pipeline.models import build_model

    meta = read_meta(model_dir)
    model = build_model(meta["name"], **meta["args"])
    state = load_file(str(Path(model_dir) / WEIGHTS), device=str(device))
    model.load_state_dict(state)
    return model.to(device).eval(), meta
