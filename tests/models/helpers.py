"""Checks shared by the backbone tests (U-Net, DiT, ControlNet)."""

from __future__ import annotations

import torch


def assert_differs(a: torch.Tensor, b: torch.Tensor, min_diff: float = 1e-3) -> None:
    """Outputs differ by more than float rounding."""
    assert (a - b).abs().max() > min_diff, (a - b).abs().max()


def perturb_(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter so zero-initialised layers pass signal and gradient."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def assert_same_gradients(ref: torch.nn.Module, other: torch.nn.Module, *inputs: torch.Tensor) -> None:
    """``other`` (same weights, e.g. with activation checkpointing) gives ``ref``'s gradient for every parameter."""
    for m in (ref, other):
        m(*inputs).square().mean().backward()
    for (name, a), b in zip(ref.named_parameters(), other.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def assert_overfits(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], target: torch.Tensor,
                    lr: float, steps: int) -> None:
    """Adam on one fixed batch drives the MSE to ``target`` below a tenth of where it started."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = (model(*inputs) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
