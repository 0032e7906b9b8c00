"""Exponential moving average of model weights, kept in fp32 beside the engine."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copies of every parameter and buffer: shadow ← d·shadow + (1−d)·param."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Blend in the current weights; the decay warms up as min(d, (1+step)/(10+step))."""
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                s.mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, ready to load into the same architecture."""
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the shadow weights from a checkpoint."""
        for k, v in state.items():
            self.shadow[k].copy_(v)
