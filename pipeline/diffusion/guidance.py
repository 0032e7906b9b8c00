"""Conditional generation: classifier-free guidance (eq. 39-40) and classifier gradients (eq. 36-38)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ModelFnY = Callable[[Tensor, Tensor, Tensor], Tensor]


def classifier_free(
    model_fn_y: ModelFnY,
    y: Tensor,
    null_label: Tensor | int | float,
    w: float,
    eps_channels: int | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap a conditional model into an unconditional-signature ``fn(x, t)`` with CFG (eq. 40).

    ε̄ = (1 + w) ε(x, t, y) − w ε(x, t, ∅), computed in ONE batched forward pass (cond and uncond
    concatenated). ``null_label`` (the ∅ label) is broadcast to ``y``'s shape. The combination is
    applied to all output channels, or only to the first ``eps_channels`` when the model also
    outputs variance channels, which are then taken from the conditional branch. Because the
    weights sum to 1, the same combination is valid for x₀- and v-prediction outputs.
    """

    def guided(x: Tensor, t: Tensor) -> Tensor:
        b = x.shape[0]
        null = torch.as_tensor(null_label, dtype=y.dtype, device=y.device).expand_as(y)
        out = model_fn_y(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out[:b], out[b:]
        c = out.shape[1] if eps_channels is None else eps_channels
        mixed = (1.0 + w) * cond[:, :c] - w * uncond[:, :c]  # eq. 40
        return torch.cat([mixed, cond[:, c:]], dim=1)

    return guided


def condition_dropout(n: int, rate: float, device: torch.device | str | None = None,
                      generator: torch.Generator | None = None) -> Tensor:
    """Which of ``n`` training conditions become ∅, each with probability ``rate``, so that one model learns
    both ε(x, t, y) and ε(x, t, ∅) for classifier-free guidance (eq. 40)."""
    return torch.rand(n, device=device, generator=generator) < rate


def drop_labels(y: Tensor, drop: Tensor, null_label: int) -> Tensor:
    """Class labels with the ``drop`` positions replaced by the null label ∅ (eq. 40)."""
    return torch.where(drop, torch.full_like(y, null_label), y)


def classifier_grad(classifier: Callable[[Tensor, Tensor], Tensor], y: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """``cond_fn(x, t) = ∇_x log f(y | x_t, t)`` from a noisy classifier returning logits (eq. 36)."""

    def cond_fn(x: Tensor, t: Tensor) -> Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[torch.arange(x.shape[0], device=x.device), y]
            return torch.autograd.grad(selected.sum(), x_in)[0]

    return cond_fn
