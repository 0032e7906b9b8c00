"""Autoencoder-family objectives, pluggable by name (`objective.type` in an autoencoder stage).

Each objective is a small object with two methods:

- ``loss(model, batch, gen, cfg) -> (loss, metrics)``: the training loss of one batch
  (``batch["image"]`` (B, C, H, W), ``batch["label"]`` (B,)); metrics are scalar tensors.
- ``evaluate(model, data_dir, cfg, seed) -> (metrics, images)``: held-out evaluation after training;
  ``metrics`` maps names (``eval/...``) to floats, ``images`` maps artifact paths to PNG bytes.
- optionally ``check_cfg(cfg)``: raise ValueError for unknown keys or bad values; called when the job
  spec is validated, so the error names ``stages.<name>.objective`` before anything runs.

``cfg`` is the stage's ``objective`` mapping. Modules register theirs with :func:`register_objective`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


class AEObjective(Protocol):
    """What an autoencoder stage trains and how it is evaluated."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], gen: torch.Generator,
             cfg: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def evaluate(self, model: nn.Module, data_dir: Path, cfg: dict[str, Any], seed: int
                 ) -> tuple[dict[str, float], dict[str, bytes]]: ...


AE_OBJECTIVES: dict[str, AEObjective] = {}


def register_objective(name: str) -> Callable[[type], type]:
    """Class decorator: register an (argument-free) objective class under ``name``."""

    def decorator(cls: type) -> type:
        if name in AE_OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        AE_OBJECTIVES[name] = cls()
        return cls

    return decorator


def get_objective(name: str) -> AEObjective:
    """The objective registered as ``name``; a ValueError lists the known ones."""
    _load_all()
    if name not in AE_OBJECTIVES:
        raise ValueError(f"unknown objective type {name!r}; known: {', '.join(sorted(AE_OBJECTIVES))}")
    return AE_OBJECTIVES[name]


def _load_all() -> None:
    # Import the objective modules so their @register_objective decorators run.
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
