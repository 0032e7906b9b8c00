"""Model output parameterisations: ε (eq. 27), x₀ and v, and conversions between them.

With x_t = √ᾱ_t x₀ + √(1-ᾱ_t) ε (eq. 17), the v target is v = √ᾱ_t ε − √(1-ᾱ_t) x₀
(Salimans & Ho, 2022). All functions take a per-sample index tensor ``t`` (B,) into ``s``
(0-indexed, see :mod:`pipeline.diffusion.schedule`).
"""

from __future__ import annotations

from torch import Tensor

from .schedule import Schedule, extract

PARAMETERIZATIONS = ("eps", "x0", "v")


def _ab(s: Schedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(√ᾱ_t, √(1-ᾱ_t)) broadcast against ``like``."""
    acp = extract(s.alphas_cumprod, t, like)
    return acp.sqrt(), (1.0 - acp).sqrt()


def predict_x0_from_eps(s: Schedule, xt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x₀ = (x_t − √(1-ᾱ_t) ε) / √ᾱ_t (eq. 17 solved for x₀)."""
    a, b = _ab(s, t, xt)
    return (xt - b * eps) / a


def predict_eps_from_x0(s: Schedule, xt: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """ε = (x_t − √ᾱ_t x₀) / √(1-ᾱ_t) (eq. 17 solved for ε)."""
    a, b = _ab(s, t, xt)
    return (xt - a * x0) / b


def v_target(s: Schedule, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """v = √ᾱ_t ε − √(1-ᾱ_t) x₀."""
    a, b = _ab(s, t, x0)
    return a * eps - b * x0


def predict_x0_from_v(s: Schedule, xt: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """x₀ = √ᾱ_t x_t − √(1-ᾱ_t) v."""
    a, b = _ab(s, t, xt)
    return a * xt - b * v


def predict_eps_from_v(s: Schedule, xt: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """ε = √(1-ᾱ_t) x_t + √ᾱ_t v."""
    a, b = _ab(s, t, xt)
    return b * xt + a * v


def score_from_eps(s: Schedule, eps: Tensor, t: Tensor) -> Tensor:
    """∇ log q(x_t) ≈ −ε / √(1-ᾱ_t) (eq. 33)."""
    _, b = _ab(s, t, eps)
    return -eps / b  # eq. 33


def split_learned_sigma(out: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """Split a learned-sigma output (B, 2C, ...) into (mean part (B, C, ...), variance part)."""
    if out.shape[1] != 2 * channels:
        raise ValueError(f"expected {2 * channels} output channels, got {out.shape[1]}")
    return out[:, :channels], out[:, channels:]


def mean_output(out: Tensor, xt: Tensor) -> Tensor:
    """The part of ``out`` that predicts ε/x₀/v: all of it, or the first half for learned sigma."""
    channels = xt.shape[1]
    if out.shape[1] == channels:
        return out
    return split_learned_sigma(out, channels)[0]


def model_eps_x0(s: Schedule, out: Tensor, xt: Tensor, t: Tensor, parameterization: str) -> tuple[Tensor, Tensor]:
    """Turn a raw model output into (ε̂, x̂₀) for ``parameterization`` in {"eps", "x0", "v"}.

    If ``out`` has twice the channels of ``xt`` (learned sigma), the first half is used.
    """
    pred = mean_output(out, xt)
    if parameterization == "eps":  # eq. 27
        return pred, predict_x0_from_eps(s, xt, t, pred)
    if parameterization == "x0":
        return predict_eps_from_x0(s, xt, t, pred), pred
    if parameterization == "v":
        return predict_eps_from_v(s, xt, t, pred), predict_x0_from_v(s, xt, t, pred)
    raise ValueError(f"unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")


def training_target(s: Schedule, x0: Tensor, t: Tensor, eps: Tensor, parameterization: str) -> Tensor:
    """What the model should predict for x_t = q_sample(x0, t, eps) under ``parameterization``."""
    if parameterization == "eps":
        return eps
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return v_target(s, x0, t, eps)
    raise ValueError(f"unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")
