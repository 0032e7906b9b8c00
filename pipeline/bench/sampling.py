"""sampling: images/s of DDPM-1000, DDIM-50, distilled 4-step and consistency 1-step sampling,
against `diffusers`' schedulers on the same denoiser and inputs.

The denoiser is the U-Net F of `jobs/ldm.yaml`'s diffusion stage (random weights, its zero-initialised
output layer re-drawn so the prediction is not trivially zero), on (B, 2, 8, 8) latents with fixed
class labels; the schedule is the job's cosine schedule, handed to diffusers as `trained_betas`.
As an ε-model it is read as ε̂(x, t) = √(1-ᾱ_t)·x + √ᾱ_t·F(x, t), whose x_0 estimate stays bounded
(a random ε-net would blow x_0 up by 1/√ᾱ_T ~ 10^4 and turn float32 rounding into large
differences); the extra elementwise ops cost both contenders the same.

* DDPM-1000: `sample_ancestral` (β̃ variance) vs `DDPMScheduler` (`fixed_small`); both draw their
  noise from a generator with the same seed in the same order, so outputs are compared too.
* DDIM-50 (η=0, ε-model): `sample_ddim` on diffusers' own `timestep_spacing="trailing"` timesteps
  vs `DDIMScheduler` (`set_alpha_to_one`: the last step lands on clean data, like ours). diffusers
  computes the previous timestep as t - T/steps, which is exact only for evenly spaced
  ("leading"/"trailing") timesteps, so our default `linspace` striding is not used here.
* distilled 4-step: a distilled student samples with 4 DDIM steps of a v-model; F read as a
  v-model, vs `DDIMScheduler(prediction_type="v_prediction")`, same timesteps; outputs compared.
* consistency 1-step: f(x, σ_max) = c_skip x + c_out F(c_in x, t(σ)) (eq. 44) vs
  `CMStochasticIterativeScheduler` with one step (no clipping); outputs compared.

All timings interleave ours and diffusers (A, B, B, A, ...) in one process; medians.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.bench import Clock, Options, Report, clock, interleave, median
from pipeline.bench.step import UNET_ARGS


def make_denoiser(seed: int = 0) -> nn.Module:
    """The ldm diffusion U-Net with random weights and a non-zero output layer, in eval mode."""
    from pipeline.models import build_model

    torch.manual_seed(seed)
    model = build_model("unet", **UNET_ARGS)
    conv = model.out[-1]
    nn.init.normal_(conv.weight, std=0.05)
    nn.init.normal_(conv.bias, std=0.01)
    return model.eval()


def _ddim_scheduler(betas: torch.Tensor, steps: int, prediction_type: str):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas.numpy(), clip_sample=False,
                          set_alpha_to_one=True, timestep_spacing="trailing", prediction_type=prediction_type)
    sched.set_timesteps(steps)
    return sched


def contenders(model: nn.Module, batch: int, seed: int = 0) -> dict[str, dict[str, Callable[[], torch.Tensor]]]:
    """sampler -> {"ours": fn, "diffusers": fn}; each fn draws one batch of samples and returns it."""
    from diffusers import CMStochasticIterativeScheduler, DDPMScheduler

    from pipeline.diffusion import Schedule, consistency_fn, sample_ancestral, sample_ddim

    s = Schedule.make("cosine", 1000)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(batch, 2, 8, 8, generator=g)
    y = torch.arange(batch) % 10

    acp = s.alphas_cumprod.float()

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # F as a v-model (or consistency net)
        return model(x, t, y=y)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # ε̂ = √(1-ᾱ) x + √ᾱ F, bounded x_0
        a = acp[t].reshape(-1, 1, 1, 1)
        return (1.0 - a).sqrt() * x + a.sqrt() * model(x, t, y=y)

    def tb(t: torch.Tensor | int | float) -> torch.Tensor:  # a scheduler's scalar timestep, per sample
        return torch.as_tensor(t).reshape(1).expand(batch)

    ddpm = DDPMScheduler(num_train_timesteps=1000, trained_betas=s.betas.numpy(), variance_type="fixed_small",
                         clip_sample=False, prediction_type="epsilon")
    ddpm.set_timesteps(1000)

    def diffusers_loop(sched: Any, f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        x = x_T.clone()
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(f(sched.scale_model_input(x, t), tb(t)), t, x, generator=gen).prev_sample
        return x

    ddim50 = _ddim_scheduler(s.betas, 50, "epsilon")
    ddim4 = _ddim_scheduler(s.betas, 4, "v_prediction")
    ts50 = sorted(int(t) for t in ddim50.timesteps)  # the same timesteps for ours
    ts4 = sorted(int(t) for t in ddim4.timesteps)
    cm = CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5,
                                        clip_denoised=False)

    def diffusers_cm() -> torch.Tensor:
        cm.set_timesteps(1)
        x = x_T * cm.init_noise_sigma
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for t in cm.timesteps:
                x = cm.step(fn(cm.scale_model_input(x, t), tb(t)), t, x, generator=gen).prev_sample
        return x

    sigma_max, sigma_data = 80.0, 0.5
    t_cm = float(1000 * 0.25 * np.log(sigma_max + 1e-44))  # the model's timestep input for σ_max

    @torch.no_grad()
    def ours_cm() -> torch.Tensor:
        x = x_T * sigma_max
        sigma = torch.full((batch,), sigma_max)
        c_in = 1.0 / (sigma_max**2 + sigma_data**2) ** 0.5
        return consistency_fn(fn(x * c_in, tb(t_cm)), x, sigma, sigma_data=sigma_data)

    gen_ours = torch.Generator()
    return {
        "DDPM-1000": {
            "ours": lambda: sample_ancestral(eps_fn, s, x_T.clone(), var_type="beta_tilde",
                                             generator=gen_ours.manual_seed(seed + 1)),
            "diffusers": lambda: diffusers_loop(ddpm, eps_fn),
        },
        "DDIM-50": {
            "ours": lambda: sample_ddim(eps_fn, s, x_T.clone(), ts50, eta=0.0),
            "diffusers": lambda: diffusers_loop(ddim50, eps_fn),
        },
        "distilled 4-step (DDIM, v)": {
            "ours": lambda: sample_ddim(fn, s, x_T.clone(), ts4, eta=0.0, parameterization="v"),
            "diffusers": lambda: diffusers_loop(ddim4, fn),
        },
        "consistency 1-step": {"ours": ours_cm, "diffusers": diffusers_cm},
    }


def run(opts: Options) -> Report:
    """Interleaved sampling of ours and diffusers per sampler; images/s, ratio and output agreement."""
    p = argparse.ArgumentParser(prog="pipeline bench sampling")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ddpm-repeats", type=int, default=None, help="repeats of the slow DDPM-1000 pair (default 3)")
    a = p.parse_args(opts.extra)
    repeats = opts.repeats or (1 if opts.quick else 5)
    ddpm_repeats = a.ddpm_repeats or (1 if opts.quick else min(repeats, 3))
    if opts.quick:
        a.batch = 2
    torch.set_num_threads(a.threads)
    model = make_denoiser()
    pairs = contenders(model, a.batch)
    if opts.quick:
        pairs.pop("DDPM-1000")
    rows: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}
    for sampler, fns in pairs.items():
        outs: dict[str, torch.Tensor] = {}

        def timed(name: str, fns: dict = fns, outs: dict = outs) -> Clock:
            with clock() as k:
                outs[name] = fns[name]()
            return k.result

        n = ddpm_repeats if sampler == "DDPM-1000" else repeats
        times = interleave({k: (lambda k=k: timed(k)) for k in fns}, n, warmup=0 if sampler == "DDPM-1000" else 1)
        diff = float((outs["ours"] - outs["diffusers"]).abs().max())
        scale = float(outs["diffusers"].abs().max())
        cpu = {k: median([c.cpu for c in v]) for k, v in times.items()}
        wall = {k: median([c.wall for c in v]) for k, v in times.items()}
        ratio = cpu["diffusers"] / cpu["ours"]
        for name in fns:
            rows.append({"sampler": sampler, "implementation": name, "CPU s/batch": cpu[name],
                         "images/CPU-s": a.batch / cpu[name], "ours speed-up (CPU)": ratio if name == "ours" else 1.0,
                         "wall s/batch": wall[name],
                         "ours speed-up (wall)": wall["diffusers"] / wall["ours"] if name == "ours" else 1.0,
                         "max |ours − diffusers|": diff,
                         "max |x|": scale, "runs": len(times[name])})
        key = sampler.split(" ")[0].lower().replace("-", "")
        ratios[f"{key}_ours_vs_diffusers_speed"] = ratio
        ratios[f"{key}_ours_vs_diffusers_speed_wall"] = wall["diffusers"] / wall["ours"]
        ratios[f"{key}_max_abs_diff"] = diff
    return Report(
        name="sampling", command="python -m pipeline.bench sampling",
        columns=["sampler", "implementation", "CPU s/batch", "images/CPU-s", "ours speed-up (CPU)",
                 "wall s/batch", "ours speed-up (wall)", "max |ours − diffusers|", "max |x|", "runs"],
        rows=rows, ratios=ratios, goals={"ddim50_ours_vs_diffusers_speed": ">= 1.0", "ddim50_max_abs_diff": "~1e-5"},
        notes=[f"batch {a.batch} latents 2x8x8, U-Net {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
               f"params, {a.threads} torch thread(s), fp32; ours speed-up = diffusers time ÷ ours time, medians; "
               "headline on the calling thread's CPU time (load-independent with 1 thread), wall alongside"],
        params=vars(a) | {"repeats": repeats, "ddpm_repeats": ddpm_repeats})
