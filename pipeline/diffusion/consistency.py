"""Consistency models (Song et al. 2023, notes 2.4.3, eq. 44-46) on a discrete VP schedule.

The pipeline's diffusion models are variance-preserving: x_t = √ᾱ_t x₀ + √(1-ᾱ_t) ε (eq. 17). Dividing by
√ᾱ_t gives the variance-exploding form the consistency-model paper works in,

    x_σ = x_t / √ᾱ_t = x₀ + σ_t ε,   σ_t = √((1-ᾱ_t) / ᾱ_t),

so every VP timestep index t is a noise level σ_t, and x_t = √ᾱ_t x_σ is the same point in the other frame.
The network always sees the VP input x_t and the original timestep (as the teacher did); f is computed in
the σ frame. The consistency function is (eq. 44)

    f_θ(x_σ, σ) = c_skip(σ) x_σ + c_out(σ) F_θ,   F_θ = −v̂,

with v̂ the network's v-prediction (any parameterisation is converted to v). With σ_data = 1 and σ_min = 0
this is exactly the teacher's x̂₀: x̂₀ = ᾱ x_σ − √(1-ᾱ) v̂ = c_skip x_σ + c_out (−v̂), because
ᾱ = 1/(1+σ²) and √(1-ᾱ) = σ/√(1+σ²). So a student copied from a v-teacher starts as the teacher's
denoiser (up to the σ_min shift), and the boundary condition f(x, σ_min) = x holds exactly.

The noise levels t_1 < … < t_N of eq. 45-46 are VP timestep indices: Karras et al. levels between σ(0) and
``sigma_max`` (ρ = 7) snapped to the timestep with the nearest log σ (duplicates dropped), so the lowest
level is index 0 (σ_min = σ_0) and the teacher is only ever called on timesteps it was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction

import torch
from torch import Tensor, nn

from .distill import consistency_fn, karras_sigmas
from .losses import ModelFn
from .param import model_eps_x0, v_target
from .sampling import ddim_step
from .schedule import Schedule, extract


def vp_sigmas(s: Schedule) -> Tensor:
    """σ_t = √((1-ᾱ_t)/ᾱ_t) for every index of ``s`` (float64, (T,)): eq. 17 divided by √ᾱ_t."""
    acp = s.alphas_cumprod
    return ((1.0 - acp) / acp).sqrt()


def to_sigma_frame(s: Schedule, x_t: Tensor, t: Tensor) -> Tensor:
    """x_σ = x_t / √ᾱ_t (VP point → VE point at σ_t)."""
    return x_t / extract(s.alphas_cumprod, t, x_t).sqrt()


def to_vp_frame(s: Schedule, x_sigma: Tensor, t: Tensor) -> Tensor:
    """x_t = √ᾱ_t x_σ (VE point at σ_t → VP point)."""
    return x_sigma * extract(s.alphas_cumprod, t, x_sigma).sqrt()


def consistency_levels(s: Schedule, n: int, sigma_max: float = 80.0, rho: float = 7.0) -> list[int]:
    """The timestep indices t_1 < … < t_N of the discretisation (at most ``n``; ascending; t_1 = 0).

    Karras levels between σ_0 and min(``sigma_max``, σ_{T-1}), each snapped to the index with the nearest
    log σ; snapped duplicates are dropped, so fewer than ``n`` levels may come back.
    """
    if n < 2:
        raise ValueError(f"a consistency model needs at least 2 noise levels, got {n}")
    sig = vp_sigmas(s)
    top = min(float(sigma_max), float(sig[-1]))
    wanted = karras_sigmas(n, float(sig[0]), top, rho)
    idx = (sig.log()[None, :] - wanted.log()[:, None]).abs().argmin(dim=1)
    return sorted(set(idx.tolist()))


def ct_num_levels(k: int, total: int, s0: int = 2, s1: int = 150) -> int:
    """N(k) of consistency training at step ``k`` of ``total`` = K (Song et al. 2023, CT schedule; eq. 46's N):

        N(k) = ⌈√(k/K · ((s1+1)² − s0²) + s0²) − 1⌉ + 1,

    growing from N(0) = s0 to N(K) = s1 + 1 (the paper's CIFAR-10 setting: s0 = 2, s1 = 150).
    """
    if total < 1 or not 0 <= k <= total:
        raise ValueError(f"need 0 <= k <= K with K >= 1, got k={k}, K={total}")
    inner = Fraction(k, total) * ((s1 + 1) ** 2 - s0**2) + s0**2  # exact: no float rounding at perfect squares
    root = math.isqrt(inner.numerator // inner.denominator)  # ⌊√inner⌋
    return root if root * root == inner else root + 1  # ⌈√inner − 1⌉ + 1 = ⌈√inner⌉


def ct_target_ema(n_levels: int, s0: int = 2, mu0: float = 0.9) -> float:
    """μ(k) = exp(s0 · log μ0 / N(k)): the target EMA rate of θ⁻ in eq. 46 when N(k) = ``n_levels``."""
    return math.exp(s0 * math.log(mu0) / n_levels)


def model_F(s: Schedule, out: Tensor, x_t: Tensor, t: Tensor, parameterization: str) -> Tensor:
    """F_θ = −v̂ from a raw network output in ``parameterization`` (eps | x0 | v)."""
    if parameterization == "v":
        return -out[:, : x_t.shape[1]]
    eps, x0 = model_eps_x0(s, out, x_t, t, parameterization)
    return -v_target(s, x0, t, eps)


def consistency_output(s: Schedule, out: Tensor, x_t: Tensor, t: Tensor, parameterization: str,
                       sigma_data: float, sigma_min: float) -> Tensor:
    """f_θ(x_σ, σ_t) = c_skip(σ_t) x_σ + c_out(σ_t) F_θ (eq. 44), in the σ frame (data scale)."""
    sigma = vp_sigmas(s).to(t.device)[t]
    x_sigma = to_sigma_frame(s, x_t, t)
    return consistency_fn(model_F(s, out, x_t, t, parameterization), x_sigma, sigma, sigma_data, sigma_min)


def adjacent_levels(levels: Tensor, batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(t_n, t_{n+1}) per sample, n uniform over the N-1 adjacent pairs of ``levels`` (ascending indices)."""
    n = torch.randint(0, len(levels) - 1, (batch,), generator=generator, device=levels.device)
    return levels[n], levels[n + 1]


@torch.no_grad()
def cd_teacher_step(s: Schedule, teacher_fn: ModelFn, x_next: Tensor, t_next: Tensor, t_cur: Tensor,
                    teacher_parameterization: str) -> Tensor:
    """x̂^φ_{t_n}: one DDIM (η = 0) step of the teacher from t_{n+1} to t_n (eq. 45's ODE solver, eq. 43).

    DDIM is the Euler step of the probability-flow ODE in the σ frame, so this is the paper's Euler solver.
    """
    eps, _ = model_eps_x0(s, teacher_fn(x_next, s.timestep_map.to(x_next.device)[t_next]), x_next, t_next,
                          teacher_parameterization)
    return ddim_step(s, eps, x_next, t_next, t_cur)  # eq. 43, σ_t = 0


def ct_pair(s: Schedule, x0: Tensor, t_next: Tensor, t_cur: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """(x_{t_{n+1}}, x_{t_n}) of eq. 46 in the VP frame, both from the SAME noise z.

    In the σ frame these are x₀ + σ_{n+1} z and x₀ + σ_n z (eq. 46); √ᾱ σ = √(1-ᾱ) makes them eq. 17 samples.
    """
    return s.q_sample(x0, t_next, noise), s.q_sample(x0, t_cur, noise)


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, mu: float) -> None:
    """θ⁻ ← μ θ⁻ + (1−μ) θ, in place, with gradients stopped (the target network of eq. 45-46)."""
    online_state = online.state_dict()
    for k, v in target.state_dict().items():
        src = online_state[k].detach().to(v.device)
        if v.dtype.is_floating_point:
            v.mul_(mu).add_(src.to(v.dtype), alpha=1.0 - mu)
        else:
            v.copy_(src)


def sampling_timesteps(levels: Sequence[int], steps: int) -> list[int]:
    """The noise levels of ``steps``-step consistency sampling, descending, the top level first.

    The top level, then levels evenly spaced (by position) along the training discretisation; never
    the lowest level (re-noising to σ_min would be a no-op).
    """
    levels = sorted(levels)
    if not 1 <= steps < len(levels):
        raise ValueError(f"steps must be in [1, {len(levels) - 1}] for {len(levels)} levels, got {steps}")
    pos = torch.linspace(len(levels) - 1, 0, steps + 1, dtype=torch.float64)[:-1].round().long().tolist()
    return [levels[p] for p in pos]


@torch.no_grad()
def sample_consistency(model_fn: ModelFn, s: Schedule, xT: Tensor, timesteps: Sequence[int], *,
                       sigma_min_index: int = 0, parameterization: str = "v", sigma_data: float = 1.0,
                       generator: torch.Generator | None = None,
                       on_step: Callable[[int, float], None] | None = None) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) on VP timestep indices.

    ``xT`` is standard normal noise; the first level τ₁ starts from x_σ = σ_{τ₁} z (VP: √(1-ᾱ) z), and
    each later level τ re-noises the current estimate: x_σ = x + √(σ_τ² − σ_min²) z. Returns data-scale
    samples (the σ_min frame). ``on_step(τ, noise_std)`` sees each level and the std of the noise added.
    """
    sig = vp_sigmas(s)
    sigma_min = float(sig[sigma_min_index])
    tmap = s.timestep_map.to(xT.device)
    x = None
    for k, tau in enumerate(timesteps):
        t = torch.full((xT.shape[0],), int(tau), dtype=torch.long, device=xT.device)
        if k == 0:
            x_sigma = float(sig[tau]) * xT
            std = float(sig[tau])
        else:
            std = (float(sig[tau]) ** 2 - sigma_min**2) ** 0.5
            z = torch.randn(xT.shape, generator=generator, device=xT.device, dtype=xT.dtype)
            x_sigma = x + std * z
        if on_step is not None:
            on_step(int(tau), std)
        x_t = to_vp_frame(s, x_sigma, t)
        x = consistency_output(s, model_fn(x_t, tmap[t]), x_t, t, parameterization, sigma_data, sigma_min)
    return x


def generator_timesteps(info: dict, steps: int | Sequence[int]) -> list[int]:
    """Sampling levels of an exported consistency model (its ``extra["consistency"]``): ``steps`` is a step
    count, or an explicit list of timestep indices (used as given, largest first)."""
    if isinstance(steps, int):
        return sampling_timesteps(info["timesteps"], steps)
    return sorted((int(t) for t in steps), reverse=True)
