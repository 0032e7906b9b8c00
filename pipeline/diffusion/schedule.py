"""Noise schedules for Gaussian diffusion (study notes, section 2, eq. 15-23 and 34).

Timestep convention: timesteps are 0-indexed. Index ``i`` in ``[0, T-1]`` is the notes'
step ``t = i + 1``; so index 0 is the first (least noisy) step and index ``T-1`` is x_T.
``alphas_cumprod_prev[0]`` is 1 (the notes' ᾱ_0 = 1, i.e. clean data).

All tables are float64 tensors on the CPU; :func:`extract` gathers per-sample values and
casts them to the dtype/device of the tensor they are combined with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor


def extract(table: Tensor, t: Tensor, shape: Sequence[int] | Tensor) -> Tensor:
    """Gather ``table[t]`` for a per-sample index tensor ``t`` (B,) and reshape to (B, 1, ..., 1).

    ``shape`` is the shape to broadcast against, or a tensor: then its shape, dtype and device
    are used. Otherwise the result has the default dtype and lives on ``t``'s device.
    """
    if isinstance(shape, Tensor):
        dtype, device, shape = shape.dtype, shape.device, shape.shape
    else:
        dtype, device = torch.get_default_dtype(), t.device
    out = table.to(device)[t.to(device)].to(dtype)
    return out.reshape(t.shape[0], *([1] * (len(shape) - 1)))


def strided_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` evenly strided indices of ``range(num_timesteps)``, always keeping 0 and T-1."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    kept = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round().long()
    return sorted(set(kept.tolist()))


def linear_betas(num_timesteps: int) -> Tensor:
    """Ho et al. linear β from 1e-4 to 0.02 (notes 2.2.3), rescaled so T != 1000 keeps ᾱ_T similar."""
    if num_timesteps <= 20:
        raise ValueError("the rescaled linear schedule needs T > 20 (β_T = 20 / T must stay below 1)")
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal cosine schedule."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64)
    f = torch.cos((steps / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2  # eq. 34: f(t)
    alphas_cumprod = f / f[0]  # eq. 34: ᾱ_t = f(t) / f(0)
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]  # eq. 34: β_t = 1 - ᾱ_t / ᾱ_{t-1}
    return betas.clamp(max=max_beta)  # eq. 34: clip(., 0.999)


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete variance schedule and the quantities derived from it (all float64, shape (T,)).

    ``timestep_map[i]`` is the timestep of the ORIGINAL schedule that index ``i`` corresponds to;
    this is what a denoiser trained on the original schedule must be given.
    """

    betas: Tensor
    timestep_map: Tensor
    alphas: Tensor = field(init=False, repr=False)
    alphas_cumprod: Tensor = field(init=False, repr=False)
    alphas_cumprod_prev: Tensor = field(init=False, repr=False)
    posterior_variance: Tensor = field(init=False, repr=False)
    posterior_log_variance_clipped: Tensor = field(init=False, repr=False)
    posterior_mean_coef1: Tensor = field(init=False, repr=False)
    posterior_mean_coef2: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        betas = self.betas.detach().to(device="cpu", dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        tmap = self.timestep_map.detach().to(device="cpu", dtype=torch.long)
        if tmap.shape != betas.shape:
            raise ValueError("timestep_map must have the same length as betas")
        alphas = 1.0 - betas  # α_t = 1 - β_t (notes, above eq. 16)
        acp = torch.cumprod(alphas, 0)  # ᾱ_t = Π α_i (eq. 16-17)
        acp_prev = torch.cat([acp.new_ones(1), acp[:-1]])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)  # eq. 21: β̃_t
        # β̃ at index 0 is 0; its log is clipped to index 1's value (Improved DDPM).
        first = post_var[1:2] if len(post_var) > 1 else betas[:1]
        post_logvar = torch.log(torch.cat([first, post_var[1:]]))
        coef1 = betas * acp_prev.sqrt() / (1.0 - acp)  # eq. 22: coefficient of x_0
        coef2 = alphas.sqrt() * (1.0 - acp_prev) / (1.0 - acp)  # eq. 22: coefficient of x_t
        for name, value in [
            ("betas", betas),
            ("timestep_map", tmap),
            ("alphas", alphas),
            ("alphas_cumprod", acp),
            ("alphas_cumprod_prev", acp_prev),
            ("posterior_variance", post_var),
            ("posterior_log_variance_clipped", post_logvar),
            ("posterior_mean_coef1", coef1),
            ("posterior_mean_coef2", coef2),
        ]:
            object.__setattr__(self, name, value)

    def to(self, device: torch.device | str) -> Schedule:
        """The same schedule with its (float64) tables on ``device``: no host→device copy per call."""
        moved = object.__new__(Schedule)
        for f in fields(self):
            object.__setattr__(moved, f.name, getattr(self, f.name).to(device))
        return moved

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_betas(cls, betas: Tensor) -> Schedule:
        """A fresh schedule (``timestep_map = arange(T)``) from explicit betas."""
        return cls(betas=betas, timestep_map=torch.arange(len(betas)))

    @classmethod
    def make(cls, kind: str, num_timesteps: int) -> Schedule:
        """``kind`` is ``"linear"`` or ``"cosine"``."""
        if kind == "linear":
            return cls.from_betas(linear_betas(num_timesteps))
        if kind == "cosine":
            return cls.from_betas(cosine_betas(num_timesteps))
        raise ValueError(f"unknown schedule kind {kind!r}")

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def respace(self, steps: int | Sequence[int]) -> Schedule:
        """Keep a subset of timesteps (``steps`` evenly strided ones if an int).

        The new betas are β_i = 1 - ᾱ_{k_i} / ᾱ_{k_{i-1}} (with ᾱ_{k_{-1}} = 1), so the kept
        marginals q(x_{k_i} | x_0) are unchanged and the respaced process is exact.
        """
        kept = strided_timesteps(self.num_timesteps, steps) if isinstance(steps, int) else sorted(set(steps))
        if not kept or kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ValueError("respaced timesteps must be a non-empty subset of range(T)")
        if kept == list(range(self.num_timesteps)):
            return self
        idx = torch.tensor(kept, dtype=torch.long)
        acp = self.alphas_cumprod[idx]
        acp_prev = torch.cat([acp.new_ones(1), acp[:-1]])
        return Schedule(betas=1.0 - acp / acp_prev, timestep_map=self.timestep_map[idx])

    # ---- forward process ----------------------------------------------------------------------
    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) (eq. 17)."""
        acp = extract(self.alphas_cumprod, t, x0)
        mean = acp.sqrt() * x0  # eq. 17
        variance = (1.0 - acp).expand_as(x0)  # eq. 17
        return mean, variance, variance.log()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = √ᾱ_t x_0 + √(1-ᾱ_t) ε (eq. 17)."""
        if noise is None:
            noise = torch.randn_like(x0)
        acp = extract(self.alphas_cumprod, t, x0)
        return acp.sqrt() * x0 + (1.0 - acp).sqrt() * noise  # eq. 17

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (eq. 19, 21, 22)."""
        mean = extract(self.posterior_mean_coef1, t, xt) * x0 + extract(self.posterior_mean_coef2, t, xt) * xt  # eq. 22
        variance = extract(self.posterior_variance, t, xt).expand_as(xt)  # eq. 21
        log_variance = extract(self.posterior_log_variance_clipped, t, xt).expand_as(xt)
        return mean, variance, log_variance
