"""Distillation targets: progressive distillation (notes 2.4.2) and consistency-model helpers (eq. 44)."""

from __future__ import annotations

import torch
from torch import Tensor

from .losses import ModelFn
from .param import model_eps_x0, v_target
from .sampling import ddim_step
from .schedule import Schedule, extract


def _alpha_sigma(s: Schedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(√ᾱ, √(1-ᾱ)) at indices ``t``, with ``t = -1`` meaning ᾱ = 1."""
    acp = extract(s.alphas_cumprod, t.clamp(min=0), like)
    acp = torch.where((t >= 0).reshape(acp.shape), acp, torch.ones_like(acp))
    return acp.sqrt(), (1.0 - acp).sqrt()


@torch.no_grad()
def progressive_distillation_target(
    s: Schedule,
    teacher_fn: ModelFn,
    x_t: Tensor,
    t: Tensor,
    t_mid: Tensor,
    t_next: Tensor,
    parameterization: str = "v",
    teacher_parameterization: str | None = None,
) -> Tensor:
    """Student target for one step t -> t_next that matches two teacher DDIM (η=0) steps (Salimans & Ho).

    The teacher goes t -> t_mid -> t_next (eq. 43, σ=0) to reach x̃_{t_next}; the returned target is the
    x̃ (or its v, for ``parameterization="v"``) for which a single DDIM step from x_t lands exactly
    on x̃_{t_next}. ``t_next = -1`` means the clean end (ᾱ = 1). Indices are into ``s``; the teacher
    is called with ``s.timestep_map`` timesteps and predicts in ``teacher_parameterization``
    (default: the same as ``parameterization``).
    """
    teacher_param = teacher_parameterization or parameterization
    tmap = s.timestep_map.to(x_t.device)
    eps_t, _ = model_eps_x0(s, teacher_fn(x_t, tmap[t]), x_t, t, teacher_param)
    x_mid = ddim_step(s, eps_t, x_t, t, t_mid)  # eq. 43, η = 0
    eps_mid, _ = model_eps_x0(s, teacher_fn(x_mid, tmap[t_mid]), x_mid, t_mid, teacher_param)
    x_next = ddim_step(s, eps_mid, x_mid, t_mid, t_next)
    # One DDIM step: x_next = a_n x̃ + s_n (x_t - a_t x̃) / s_t; solve for x̃.
    a_t, s_t = _alpha_sigma(s, t, x_t)
    a_n, s_n = _alpha_sigma(s, t_next, x_t)
    ratio = s_n / s_t
    x0_target = (x_next - ratio * x_t) / (a_n - ratio * a_t)
    if parameterization == "x0":
        return x0_target
    eps_target = (x_t - a_t * x0_target) / s_t
    if parameterization == "v":
        return v_target(s, x0_target, t, eps_target)
    if parameterization == "eps":
        return eps_target
    raise ValueError(f"unknown parameterization {parameterization!r}")


def consistency_skip_out(sigma: Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of f(x, σ) = c_skip x + c_out F(x, σ) (eq. 44).

    c_skip(σ_min) = 1 and c_out(σ_min) = 0, so f is the identity at the smallest noise level.
    """
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)  # eq. 44
    c_out = (sigma - sigma_min) * sigma_data / (sigma_data**2 + sigma**2).sqrt()  # eq. 44
    return c_skip, c_out


def consistency_fn(
    model_out: Tensor, x: Tensor, sigma: Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002
) -> Tensor:
    """f_θ(x, σ) = c_skip(σ) x + c_out(σ) F_θ(x, σ) (eq. 44); ``sigma`` is per-sample (B,)."""
    c_skip, c_out = consistency_skip_out(sigma, sigma_data, sigma_min)
    shape = (-1,) + (1,) * (x.ndim - 1)
    return c_skip.reshape(shape).to(x) * x + c_out.reshape(shape).to(x) * model_out


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Karras et al. noise levels, descending, shape (n,):
    σ_i = (σ_max^{1/ρ} + i/(n-1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ."""
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho
