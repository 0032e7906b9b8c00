"""Negative log-likelihood bound in bits/dim: the full L_VLB = L_T + L_{T-1} + ... + L_0 (eq. 25-26)."""

from __future__ import annotations

import torch
from torch import Tensor

from .losses import ModelFn, prior_bpd, vlb_terms
from .schedule import Schedule


@torch.no_grad()
def nll_bits_per_dim(
    model_fn: ModelFn,
    s: Schedule,
    x0: Tensor,
    *,
    parameterization: str = "eps",
    learn_sigma: bool = False,
    var_type: str = "beta",
    decoder: str = "discretized",
    clip_denoised: bool = False,
    noise_generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample L_VLB (eq. 26) in bits/dim, shape (B,): all T terms plus the prior term L_T.

    Each term uses a fresh x_t ~ q(x_t | x_0) (eq. 17), drawn from ``noise_generator``; the model
    is called with ``s.timestep_map[t]``. ``decoder`` picks L_0 (see :mod:`.losses`).
    """
    total = prior_bpd(s, x0)  # L_T
    tmap = s.timestep_map.to(x0.device)
    for i in reversed(range(s.num_timesteps)):
        t = torch.full((x0.shape[0],), i, dtype=torch.long, device=x0.device)
        noise = torch.randn(x0.shape, generator=noise_generator, dtype=x0.dtype, device=x0.device)
        xt = s.q_sample(x0, t, noise)
        out = model_fn(xt, tmap[t])
        total = total + vlb_terms(
            s,
            out,
            x0,
            xt,
            t,
            parameterization=parameterization,
            learn_sigma=learn_sigma,
            var_type=var_type,
            decoder=decoder,
            clip_denoised=clip_denoised,
        )
    return total
