"""Reverse-process distributions, variational bound terms and training losses (eq. 24-31, 35).

Timesteps are 0-indexed per-sample tensors ``t`` (B,); index 0 is the notes' t = 1, so the
decoder term L_0 = −log p(x_0 | x_1) is evaluated where ``t == 0``. Bound terms are returned
in bits per dimension (averaged over all non-batch dimensions, divided by ln 2).

Decoders for L_0: ``"discretized"`` is the 8-bit discretised Gaussian of Ho et al. for data in
[-1, 1]; ``"gaussian"`` is a continuous Gaussian density for continuous data (e.g. 2-D toy data),
whose "bits per dim" is a differential entropy and may be negative.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .param import mean_output, model_eps_x0, split_learned_sigma, training_target
from .schedule import Schedule, extract

ModelFn = Callable[[Tensor, Tensor], Tensor]


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Elementwise log density of a continuous Gaussian with std exp(log_scales), in nats."""
    z = (x - means) * torch.exp(-log_scales)
    return -0.5 * math.log(2 * math.pi) - log_scales - 0.5 * z**2


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Elementwise log-probability (nats) of 8-bit data x in [-1, 1] under a discretised Gaussian.

    Each value owns a bin of width 2/255 centred on it; the edge bins extend to ±inf.
    Log-CDFs are computed with ``log_ndtr`` so the tails stay finite (Improved DDPM, appendix).
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X <= x + 1/255)
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(X >= x - 1/255)
    cdf_delta = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    # In the far tails the difference of CDFs underflows; use the symmetric survival difference there.
    sf_delta = torch.special.ndtr(-lower) - torch.special.ndtr(-upper)
    log_mid = torch.log(torch.maximum(cdf_delta, sf_delta).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mid))


def learned_log_variance(s: Schedule, v: Tensor, t: Tensor) -> Tensor:
    """log Σ = v' log β_t + (1 − v') log β̃_t with v' = (v + 1) / 2 mapping [-1, 1] to [0, 1] (eq. 35)."""
    frac = (v + 1.0) / 2.0
    max_log = extract(torch.log(s.betas), t, v)
    min_log = extract(s.posterior_log_variance_clipped, t, v)
    return frac * max_log + (1.0 - frac) * min_log  # eq. 35


def p_mean_variance(
    s: Schedule,
    out: Tensor,
    xt: Tensor,
    t: Tensor,
    parameterization: str = "eps",
    learn_sigma: bool = False,
    var_type: str = "beta",
    clip_denoised: bool = False,
) -> dict[str, Tensor]:
    """Mean and variance of p_θ(x_{t-1} | x_t) (eq. 18) from a raw model output.

    ``var_type`` (fixed variances): ``"beta"`` uses σ_t² = β_t, ``"beta_tilde"`` uses β̃_t (eq. 21).
    With ``learn_sigma`` the second half of ``out``'s channels interpolates between them (eq. 35).
    Returns dict(mean, variance, log_variance, pred_x0, eps).
    """
    if learn_sigma:
        _, var_out = split_learned_sigma(out, xt.shape[1])
        log_variance = learned_log_variance(s, var_out, t)
        variance = log_variance.exp()
    elif var_type == "beta":
        log_variance = extract(torch.log(s.betas), t, xt).expand_as(xt)
        variance = extract(s.betas, t, xt).expand_as(xt)
    elif var_type == "beta_tilde":
        log_variance = extract(s.posterior_log_variance_clipped, t, xt).expand_as(xt)
        variance = extract(s.posterior_variance, t, xt).expand_as(xt)
    else:
        raise ValueError(f"unknown var_type {var_type!r}")
    eps, pred_x0 = model_eps_x0(s, out, xt, t, parameterization)
    if clip_denoised:
        pred_x0 = pred_x0.clamp(-1.0, 1.0)
        eps = (xt - extract(s.alphas_cumprod, t, xt).sqrt() * pred_x0) / extract(1.0 - s.alphas_cumprod, t, xt).sqrt()
    # eq. 22 with x̂_0 plugged in; for ε-prediction this equals eq. 27.
    mean, _, _ = s.q_posterior(pred_x0, xt, t)
    return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_x0": pred_x0, "eps": eps}


def decoder_nll(x0: Tensor, mean: Tensor, log_variance: Tensor, decoder: str = "discretized") -> Tensor:
    """Elementwise −log p_θ(x_0 | x_1) in nats (the L_0 term of eq. 25)."""
    log_scales = 0.5 * log_variance
    if decoder == "discretized":
        return -discretized_gaussian_log_likelihood(x0, mean, log_scales)
    if decoder == "gaussian":
        return -gaussian_log_likelihood(x0, mean, log_scales)
    raise ValueError(f"unknown decoder {decoder!r}")


def vlb_terms(
    s: Schedule,
    out: Tensor,
    x0: Tensor,
    xt: Tensor,
    t: Tensor,
    *,
    parameterization: str = "eps",
    learn_sigma: bool = False,
    var_type: str = "beta",
    decoder: str = "discretized",
    clip_denoised: bool = False,
) -> Tensor:
    """One VLB term per sample, in bits/dim: L_{t} = KL(q(x_{t-1}|x_t,x_0) || p_θ(x_{t-1}|x_t)) for
    t > 0 (eq. 25), and the decoder NLL L_0 = −log p_θ(x_0 | x_1) where ``t == 0``. Returns (B,)."""
    true_mean, _, true_log_var = s.q_posterior(x0, xt, t)
    p = p_mean_variance(s, out, xt, t, parameterization, learn_sigma, var_type, clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)  # eq. 25
    nll = mean_flat(decoder_nll(x0, p["mean"], p["log_variance"], decoder)) / math.log(2.0)  # eq. 25: L_0
    return torch.where(t.to(kl.device) == 0, nll, kl)


def prior_bpd(s: Schedule, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim (eq. 25), shape (B,)."""
    t = torch.full((x0.shape[0],), s.num_timesteps - 1, dtype=torch.long, device=x0.device)
    mean, _, log_var = s.q_mean_variance(x0, t)
    zeros = torch.zeros_like(mean)
    return mean_flat(normal_kl(mean, log_var, zeros, zeros)) / math.log(2.0)


def diffusion_loss(
    model_fn: ModelFn,
    s: Schedule,
    x0: Tensor,
    t: Tensor,
    noise: Tensor | None = None,
    *,
    parameterization: str = "eps",
    loss_type: str = "simple",
    lambda_vlb: float = 0.001,
    learn_sigma: bool = False,
    var_type: str = "beta",
    decoder: str = "discretized",
) -> dict[str, Tensor]:
    """Per-sample training loss. Returns dict(loss, mse, vlb), each of shape (B,).

    ``mse`` is L_simple (eq. 30-31) on whatever the parameterisation predicts (ε, x₀ or v).
    ``loss_type="hybrid"`` adds λ·T·L_t, where L_t is this sample's VLB term (bits/dim) and T·L_t
    is the uniform-t estimate of L_VLB (eq. 26); the mean is detached there so the VLB only trains
    the variance (Improved DDPM). For ``"simple"``, ``vlb`` is zeros.
    """
    if noise is None:
        noise = torch.randn_like(x0)
    xt = s.q_sample(x0, t, noise)  # eq. 17
    out = model_fn(xt, s.timestep_map.to(t.device)[t])
    target = training_target(s, x0, t, noise, parameterization)
    mse = mean_flat((target - mean_output(out, xt)) ** 2)  # eq. 30
    if loss_type == "simple":
        vlb = torch.zeros_like(mse)
        loss = mse
    elif loss_type == "hybrid":
        channels = xt.shape[1]
        frozen = torch.cat([out[:, :channels].detach(), out[:, channels:]], dim=1) if learn_sigma else out.detach()
        vlb = vlb_terms(
            s,
            frozen,
            x0,
            xt,
            t,
            parameterization=parameterization,
            learn_sigma=learn_sigma,
            var_type=var_type,
            decoder=decoder,
        )
        loss = mse + lambda_vlb * s.num_timesteps * vlb
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return {"loss": loss, "mse": mse, "vlb": vlb}


# ---- timestep sampling --------------------------------------------------------------------------
def uniform_timesteps(
    batch_size: int,
    num_timesteps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """t ~ Uniform{0, ..., T-1} per sample (Algorithm 1, line 3), LongTensor (B,)."""
    t = torch.randint(0, num_timesteps, (batch_size,), generator=generator)
    return t.to(device) if device is not None else t


class LossHistory(NamedTuple):
    """Recent squared VLB terms per timestep, for importance sampling (Improved DDPM).

    ``values``: (T, K) float64, the last K values of L_t² for each t; ``counts``: (T,) how many were seen.
    """

    values: Tensor
    counts: Tensor


def init_loss_history(num_timesteps: int, history_per_term: int = 10) -> LossHistory:
    """An empty history; sampling stays uniform until every t has ``history_per_term`` entries."""
    return LossHistory(
        torch.zeros(num_timesteps, history_per_term, dtype=torch.float64),
        torch.zeros(num_timesteps, dtype=torch.long),
    )


def update_loss_history(history: LossHistory, t: Tensor, losses: Tensor) -> LossHistory:
    """A new history with the squared per-sample ``losses`` (B,) recorded at timesteps ``t`` (B,)."""
    values, counts = history.values.clone(), history.counts.clone()
    k = values.shape[1]
    for ti, li in zip(t.tolist(), losses.detach().double().cpu().tolist(), strict=True):
        if counts[ti] >= k:
            values[ti, :-1] = values[ti, 1:].clone()
            values[ti, -1] = li**2
        else:
            values[ti, counts[ti]] = li**2
        counts[ti] += 1
    return LossHistory(values, counts)


def importance_timesteps(
    history: LossHistory,
    batch_size: int,
    generator: torch.Generator | None = None,
    uniform_prob: float = 0.001,
) -> tuple[Tensor, Tensor]:
    """Sample t with p_t ∝ sqrt(E[L_t²]) (mixed with ``uniform_prob`` of uniform); returns (t, weights).

    ``weights = 1 / (T p_t)`` keeps the weighted loss an unbiased estimate of the uniform mean.
    Until warmed up (every t has a full history) sampling is uniform with unit weights.
    """
    num_t, k = history.values.shape
    if bool((history.counts < k).any()):
        return uniform_timesteps(batch_size, num_t, generator), torch.ones(batch_size, dtype=torch.float64)
    probs = history.values.mean(dim=1).sqrt()
    probs = probs / probs.sum()
    probs = probs * (1.0 - uniform_prob) + uniform_prob / num_t
    t = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
    return t, 1.0 / (num_t * probs[t])
