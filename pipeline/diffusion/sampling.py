"""Samplers: ancestral DDPM (Algorithm 2, eq. 28), DDIM (eq. 41-43) and annealed Langevin (eq. 32).

``model_fn(x, t)`` is always called with ``t`` = ``s.timestep_map[i]``, the ORIGINAL-schedule
timestep, so a model trained on a T-step schedule can sample on ``s.respace(n)`` (strided sampling).
Indices into ``s`` are 0-indexed (index 0 is the notes' t = 1).

Guidance: ``cond_fn(x, t) -> ∇_x log f(y | x_t)`` (see :mod:`.guidance`) with ``guidance_scale``;
ancestral sampling shifts the mean by scale·Σ·grad (Algorithm 1, fig. 2-7); DDIM uses
ε̂ = ε − √(1-ᾱ_t)·scale·grad (eq. 37-38).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .losses import ModelFn, p_mean_variance
from .param import model_eps_x0
from .schedule import Schedule, extract

CondFn = Callable[[Tensor, Tensor], Tensor]
Progress = bool | Callable[[int, int], None]


def _init_x(
    shape_or_xT: Sequence[int] | Tensor,
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> Tensor:
    if isinstance(shape_or_xT, Tensor):
        return shape_or_xT
    return torch.randn(tuple(shape_or_xT), generator=generator, device=device, dtype=dtype)


def _steps(indices: Sequence[int], progress: Progress) -> Iterable[tuple[int, int]]:
    """Enumerate ``indices`` with an optional tqdm bar (``progress=True``) or callback(done, total)."""
    items: Iterable[int] = indices
    if progress is True:
        try:
            from tqdm.auto import tqdm

            items = tqdm(indices)
        except ImportError:  # pragma: no cover - tqdm is optional
            pass
    for n, i in enumerate(items):
        yield n, i
        if callable(progress):
            progress(n + 1, len(indices))


def _full(i: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)


@torch.no_grad()
def sample_ancestral(
    model_fn: ModelFn,
    s: Schedule,
    shape_or_xT: Sequence[int] | Tensor,
    *,
    parameterization: str = "eps",
    learn_sigma: bool = False,
    var_type: str = "beta",
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    cond_fn: CondFn | None = None,
    guidance_scale: float = 0.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: Progress = False,
) -> Tensor:
    """DDPM ancestral sampling over all indices of ``s`` (Algorithm 2 / eq. 28).

    On a respaced schedule this is strided sampling. ``shape_or_xT`` is the output shape or x_T itself.
    """
    x = _init_x(shape_or_xT, generator, device, dtype)
    tmap = s.timestep_map.to(x.device)
    for _, i in _steps(list(reversed(range(s.num_timesteps))), progress):
        t = _full(i, x)
        out = model_fn(x, tmap[t])
        p = p_mean_variance(s, out, x, t, parameterization, learn_sigma, var_type, clip_denoised)
        mean = p["mean"]
        if cond_fn is not None and guidance_scale != 0.0:
            with torch.enable_grad():
                grad = cond_fn(x, tmap[t])
            mean = mean + guidance_scale * p["variance"] * grad  # Algorithm 1 (fig. 2-7)
        if i > 0:  # Algorithm 2, line 3: no noise at the last step
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = mean + torch.exp(0.5 * p["log_variance"]) * z  # eq. 28
        else:
            x = mean
    return x


def dynamic_threshold(x0: Tensor, quantile: float) -> Tensor:
    """Imagen's dynamic thresholding of a predicted x̂₀ (Saharia et al., 2022).

    Per sample, s = max(1, the ``quantile`` of |x̂₀|); x̂₀ is clipped to [-s, s] and divided by s, so
    saturated pixels are pushed inwards instead of piling up at ±1 (large guidance weights).
    """
    s = torch.quantile(x0.abs().flatten(1).float(), quantile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.dim() - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def ddim_step(
    s: Schedule,
    eps: Tensor,
    xt: Tensor,
    t: Tensor,
    t_prev: Tensor,
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> Tensor:
    """One generalised DDIM step x_t -> x_{t_prev} (eq. 41-43).

    ``t`` and ``t_prev`` are per-sample indices into ``s``; ``t_prev = -1`` means ᾱ_prev = 1 (clean data).
    σ_t² = η·β̃ with β̃ = (1-ᾱ_prev)/(1-ᾱ_t)·(1-ᾱ_t/ᾱ_prev), so η = 1 gives the DDPM posterior variance.
    """
    acp_t = extract(s.alphas_cumprod, t, xt)
    t_prev = t_prev.to(t.device)
    acp_prev = extract(s.alphas_cumprod, t_prev.clamp(min=0), xt)
    acp_prev = torch.where((t_prev >= 0).reshape(acp_prev.shape), acp_prev, torch.ones_like(acp_prev))
    x0 = (xt - (1.0 - acp_t).sqrt() * eps) / acp_t.sqrt()  # eq. 41: predicted x_0
    var = eta * (1.0 - acp_prev) / (1.0 - acp_t) * (1.0 - acp_t / acp_prev)  # eq. 21 between t and t_prev
    dir_coef = (1.0 - acp_prev - var).clamp(min=0.0).sqrt()
    x_prev = acp_prev.sqrt() * x0 + dir_coef * eps  # eq. 43 (mean)
    if eta > 0.0:
        if noise is None:
            noise = torch.randn_like(xt)
        x_prev = x_prev + var.sqrt() * noise  # eq. 41: + σ_t ε
    return x_prev


@torch.no_grad()
def sample_ddim(
    model_fn: ModelFn,
    s: Schedule,
    shape_or_xT: Sequence[int] | Tensor,
    steps: int | Sequence[int],
    *,
    eta: float = 0.0,
    parameterization: str = "eps",
    clip_denoised: bool = False,
    threshold: float | None = None,
    generator: torch.Generator | None = None,
    cond_fn: CondFn | None = None,
    guidance_scale: float = 0.0,
    return_trajectory: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: Progress = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """DDIM sampling on ``steps`` evenly strided timesteps of ``s`` (or an explicit list) (eq. 43).

    ``clip_denoised`` clips the predicted x̂₀ to [-1, 1]; ``threshold`` (a quantile, e.g. 0.995) applies
    :func:`dynamic_threshold` to it instead; either way ε̂ is recomputed from the new x̂₀ (eq. 41).
    With ``return_trajectory`` also returns the stacked states (steps + 1, *shape), x_T first.
    """
    r = s.respace(steps)
    x = _init_x(shape_or_xT, generator, device, dtype)
    tmap = r.timestep_map.to(x.device)
    traj = [x]
    for _, i in _steps(list(reversed(range(r.num_timesteps))), progress):
        t = _full(i, x)
        out = model_fn(x, tmap[t])
        eps, x0 = model_eps_x0(r, out, x, t, parameterization)
        if clip_denoised or threshold is not None:
            x0 = dynamic_threshold(x0, threshold) if threshold is not None else x0.clamp(-1.0, 1.0)
            acp = extract(r.alphas_cumprod, t, x)
            eps = (x - acp.sqrt() * x0) / (1.0 - acp).sqrt()  # eq. 41 solved for ε
        if cond_fn is not None and guidance_scale != 0.0:
            with torch.enable_grad():
                grad = cond_fn(x, tmap[t])
            eps = eps - (1.0 - extract(r.alphas_cumprod, t, x)).sqrt() * guidance_scale * grad  # eq. 38
        noise = None
        if eta > 0.0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = ddim_step(r, eps, x, t, t - 1, eta=eta, noise=noise)
        if return_trajectory:
            traj.append(x)
    if return_trajectory:
        return x, torch.stack(traj)
    return x


def langevin_step(x: Tensor, score: Tensor, delta: float, z: Tensor) -> Tensor:
    """One Langevin update x + δ/2 · ∇ log p(x) + √δ · z (eq. 32)."""
    return x + 0.5 * delta * score + delta**0.5 * z  # eq. 32


@torch.no_grad()
def sample_langevin(
    score_fn: Callable[[Tensor, Tensor], Tensor],
    sigmas: Sequence[float] | Tensor,
    shape: Sequence[int],
    steps_per_level: int,
    step_size: float,
    generator: torch.Generator | None = None,
    x_init: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon, 2019) built on eq. 32.

    ``sigmas`` are the noise levels, largest first; ``score_fn(x, sigma)`` gets sigma as a (B,)
    tensor. At level i the step is δ_i = step_size·σ_i²/σ_L². Starts from N(0, σ_1² I) unless
    ``x_init`` is given.
    """
    sig = torch.as_tensor(sigmas, dtype=torch.float64)
    if x_init is None:
        x = torch.randn(tuple(shape), generator=generator, dtype=dtype) * float(sig[0])
    else:
        x = x_init
    for sigma in sig.tolist():
        delta = step_size * (sigma / float(sig[-1])) ** 2
        sigma_b = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        for _ in range(steps_per_level):
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = langevin_step(x, score_fn(x, sigma_b), delta, z)  # eq. 32
    return x


def langevin_timesteps(s: Schedule, n: int) -> list[int]:
    """``n`` noise levels for annealed Langevin: σ geometric between σ_0 and σ_{T-1} (Song & Ermon's
    levels), each snapped to the index of ``s`` with the nearest log σ (ascending; duplicates dropped)."""
    if n < 1:
        raise ValueError(f"Langevin needs at least 1 noise level, got {n}")
    acp = s.alphas_cumprod
    log_sig = 0.5 * ((1.0 - acp) / acp).log()  # log σ_t, σ_t = √((1-ᾱ_t)/ᾱ_t)
    wanted = torch.linspace(float(log_sig[-1]), float(log_sig[0]), n, dtype=torch.float64)
    return sorted(set((log_sig[None, :] - wanted[:, None]).abs().argmin(dim=1).tolist()))


@torch.no_grad()
def sample_langevin_vp(
    model_fn: ModelFn,
    s: Schedule,
    shape_or_xT: Sequence[int] | Tensor,
    steps: int | Sequence[int],
    *,
    langevin_steps: int = 3,
    step_ratio: float = 0.5,
    parameterization: str = "eps",
    denoise: bool = True,
    generator: torch.Generator | None = None,
    cond_fn: CondFn | None = None,
    guidance_scale: float = 0.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: Progress = False,
) -> Tensor:
    """Annealed Langevin sampling (eq. 32) with the diffusion model's score (eq. 33), on ``steps`` levels.

    The noise levels are :func:`langevin_timesteps` (or the explicit indices ``steps``), largest first.
    Each level works in the σ frame x_σ = x_t / √ᾱ_t (σ_t = √((1-ᾱ_t)/ᾱ_t)), where the score of eq. 33 reads
    ∇ log p_σ(x_σ) = √ᾱ_t · (−ε_θ / √(1-ᾱ_t)) = −ε_θ / σ_t, and takes ``langevin_steps`` steps of eq. 32
    with δ = ``step_ratio``·σ_t² (Song & Ermon's δ_i ∝ σ_i²). ``shape_or_xT`` is standard normal noise
    (or its shape); the chain starts at x_σ = σ_top·x_T. With ``denoise`` the last level's x̂₀ = x_σ − σ ε_θ
    (eq. 41's x̂₀ in the σ frame) is returned, else x_σ. Classifier guidance adds scale·√ᾱ_t·∇_{x_t} log f
    (the classifier's score in the σ frame, as eq. 38 adds it to ε).
    """
    if langevin_steps < 1 or step_ratio <= 0:
        raise ValueError(f"langevin_steps must be >= 1 and step_ratio > 0, got {langevin_steps}, {step_ratio}")
    r = s.respace(langevin_timesteps(s, steps) if isinstance(steps, int) else steps)
    x = _init_x(shape_or_xT, generator, device, dtype)
    acp = r.alphas_cumprod
    sigmas = ((1.0 - acp) / acp).sqrt()  # float64 (K,)
    tmap = r.timestep_map.to(x.device)
    x = x * float(sigmas[-1])  # x_σ at the top level
    eps = torch.zeros_like(x)
    for _, i in _steps(list(reversed(range(r.num_timesteps))), progress):
        t = _full(i, x)
        sigma, root_acp = float(sigmas[i]), float(acp[i]) ** 0.5
        delta = step_ratio * sigma**2
        for _ in range(langevin_steps):
            x_t = root_acp * x  # the VP point the network was trained on (eq. 17)
            eps, _ = model_eps_x0(r, model_fn(x_t, tmap[t]), x_t, t, parameterization)
            score = -eps / sigma  # eq. 33 in the σ frame
            if cond_fn is not None and guidance_scale != 0.0:
                with torch.enable_grad():
                    score = score + guidance_scale * root_acp * cond_fn(x_t, tmap[t])
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = langevin_step(x, score, delta, z)  # eq. 32
    if denoise:
        x_t = float(acp[0]) ** 0.5 * x
        t = _full(0, x)
        eps, _ = model_eps_x0(r, model_fn(x_t, tmap[t]), x_t, t, parameterization)
        x = x - float(sigmas[0]) * eps  # x̂₀ = x_σ − σ ε̂ (eq. 41 with x_t = √ᾱ x_σ)
    return x


# ----------------------------------------------------------------------------- the sampler registry


@dataclass(frozen=True)
class SamplerOptions:
    """Everything a sampler of the registry may read; each sampler ignores what it does not use."""

    parameterization: str = "eps"
    learn_sigma: bool = False
    var_type: str = "beta"
    eta: float = 0.0  # ddim
    langevin_steps: int = 3  # langevin: steps of eq. 32 per noise level
    langevin_step_ratio: float = 0.5  # langevin: δ / σ² at every level
    generator: torch.Generator | None = None
    cond_fn: CondFn | None = None
    guidance_scale: float = 0.0


Sampler = Callable[[ModelFn, Schedule, Tensor, "int | Sequence[int]", SamplerOptions], Tensor]


def _ancestral(model_fn: ModelFn, s: Schedule, xT: Tensor, steps: int | Sequence[int], o: SamplerOptions) -> Tensor:
    return sample_ancestral(model_fn, s.respace(steps), xT, parameterization=o.parameterization,
                            learn_sigma=o.learn_sigma, var_type=o.var_type, generator=o.generator,
                            cond_fn=o.cond_fn, guidance_scale=o.guidance_scale)


def _ddim(model_fn: ModelFn, s: Schedule, xT: Tensor, steps: int | Sequence[int], o: SamplerOptions) -> Tensor:
    return sample_ddim(model_fn, s, xT, steps, eta=o.eta, parameterization=o.parameterization,
                       generator=o.generator, cond_fn=o.cond_fn, guidance_scale=o.guidance_scale)


def _langevin(model_fn: ModelFn, s: Schedule, xT: Tensor, steps: int | Sequence[int], o: SamplerOptions) -> Tensor:
    return sample_langevin_vp(model_fn, s, xT, steps, langevin_steps=o.langevin_steps,
                              step_ratio=o.langevin_step_ratio, parameterization=o.parameterization,
                              generator=o.generator, cond_fn=o.cond_fn, guidance_scale=o.guidance_scale)


SAMPLERS: dict[str, Sampler] = {"ancestral": _ancestral, "ddim": _ddim, "langevin": _langevin}


def run_sampler(name: str, model_fn: ModelFn, s: Schedule, xT: Tensor, steps: int | Sequence[int],
                options: SamplerOptions | None = None) -> Tensor:
    """Sample with the registered sampler ``name`` from x_T (standard normal) in ``steps`` steps (or levels).

    ``ancestral``: Algorithm 2 on ``s.respace(steps)`` (all T steps when ``steps`` = T); ``ddim``: eq. 41-43;
    ``langevin``: annealed Langevin (eq. 32) with the score of eq. 33 on ``steps`` noise levels.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](model_fn, s, xT, steps, options or SamplerOptions())
