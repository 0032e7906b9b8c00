"""step: training-step throughput of each backbone against the `diffusers` model of the same size.

Every contender takes the same training step on the same inputs: ε-prediction MSE on
x_t = √ᾱ x_0 + √(1-ᾱ) ε with class labels, backward, AdamW step. Models:

* U-Net of `jobs/ldm.yaml`'s diffusion stage vs `diffusers.UNet2DModel` with the same blocks
  (ResNet scale/shift conditioning, attention at 1/2 resolution): parameters within 0.1%.
* DiT-S/2 vs `diffusers.DiTTransformer2DModel`. diffusers gives every block its own
  timestep + label embedder, so at the same depth it has ~8% more parameters (but the same
  FLOPs up to those small MLPs); the headline compares against diffusers with one block fewer,
  which is within 1% in parameters, and the same-architecture model is reported alongside.

Contenders of one backbone are interleaved in one process; medians of `--repeats` rounds.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.bench import Clock, Options, Report, clock, interleave, median

UNET_ARGS: dict[str, Any] = {"in_channels": 2, "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1,
                             "attention_resolutions": [2], "num_heads": 4, "num_classes": 10}


def n_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def _ours_unet() -> nn.Module:
    from pipeline.models import build_model

    return build_model("unet", **UNET_ARGS)


def _diffusers_unet(size: int) -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=size, in_channels=2, out_channels=2, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=11,
                       attention_head_dim=16, norm_num_groups=32, resnet_time_scale_shift="scale_shift")


def _ours_dit(size: int) -> nn.Module:
    from pipeline.models import build_model

    return build_model("DiT-S/2", input_size=size, in_channels=4, num_classes=10, learn_sigma=True)


def _diffusers_dit(size: int, depth: int) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8,
                                 num_layers=depth, sample_size=size, patch_size=2, num_embeds_ada_norm=10)


def make_step(model: nn.Module, call: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
              batch: dict[str, torch.Tensor], steps: int) -> Callable[[], Clock]:
    """A callable running `steps` training steps and returning wall and CPU seconds per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    c = batch["x0"].shape[1]

    def run() -> Clock:
        with clock() as k:
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                out = call(model, batch["xt"], batch["t"], batch["y"])
                loss = F.mse_loss(out[:, :c], batch["eps"])
                loss.backward()
                opt.step()
        return Clock(k.result.wall / steps, k.result.cpu / steps)

    return run


def _batch(b: int, c: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    from pipeline.diffusion import Schedule

    g = torch.Generator().manual_seed(seed)
    s = Schedule.make("cosine", 1000)
    x0 = torch.randn(b, c, size, size, generator=g)
    eps = torch.randn(b, c, size, size, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    return {"x0": x0, "eps": eps, "t": t, "y": torch.randint(0, 10, (b,), generator=g),
            "xt": s.q_sample(x0, t, eps)}


def _ours_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return m(x, t, y=y)


def _unet_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return m(x, t, class_labels=y).sample


def _dit_call(m: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return m(x, timestep=t, class_labels=y).sample


def run(opts: Options) -> Report:
    """Interleaved training steps of our backbones and diffusers' of the same size."""
    p = argparse.ArgumentParser(prog="pipeline bench step")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the training loop's default is 1)")
    p.add_argument("--unet-batch", type=int, default=128)
    p.add_argument("--dit-batch", type=int, default=8)
    p.add_argument("--dit-size", type=int, default=16, help="latent side (DiT-S/2: (size/2)^2 tokens)")
    a = p.parse_args(opts.extra)
    repeats = opts.repeats or (1 if opts.quick else 5)
    if opts.quick:
        a.unet_batch, a.dit_batch, a.dit_size = 8, 2, 8
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}

    groups = {
        "unet": (_batch(a.unet_batch, 2, 8), {
            "ours UNet (ldm diffusion)": (_ours_unet(), _ours_call),
            "diffusers UNet2DModel": (_diffusers_unet(8), _unet_call),
        }, 2),
        "dit": (_batch(a.dit_batch, 4, a.dit_size), {
            "ours DiT-S/2": (_ours_dit(a.dit_size), _ours_call),
            "diffusers DiT, 11 blocks (params matched)": (_diffusers_dit(a.dit_size, 11), _dit_call),
            "diffusers DiT, 12 blocks (same architecture)": (_diffusers_dit(a.dit_size, 12), _dit_call),
        }, 1),
    }
    for group, (batch, models, steps) in groups.items():
        fns = {name: make_step(m, call, batch, steps) for name, (m, call) in models.items()}
        times = interleave(fns, repeats, warmup=1)
        ours_name = next(iter(models))
        base_params = n_params(models[ours_name][0])
        cpu = {n: median([c.cpu for c in ts]) for n, ts in times.items()}
        wall = {n: median([c.wall for c in ts]) for n, ts in times.items()}
        for name, (m, _) in models.items():
            rows.append({"backbone": group, "model": name, "params (M)": n_params(m) / 1e6,
                         "params vs ours": n_params(m) / base_params,
                         "batch": len(batch["x0"]), "input": "x".join(map(str, batch["x0"].shape[1:])),
                         "CPU s/step": cpu[name], "samples/CPU-s": len(batch["x0"]) / cpu[name],
                         "ours speed-up (CPU)": cpu[name] / cpu[ours_name],
                         "wall s/step": wall[name], "ours speed-up (wall)": wall[name] / wall[ours_name],
                         "runs": len(times[name])})
        names = list(models)
        ratios[f"{group}_ours_vs_diffusers_throughput"] = cpu[names[1]] / cpu[ours_name]
        ratios[f"{group}_ours_vs_diffusers_throughput_wall"] = wall[names[1]] / wall[ours_name]
    return Report(
        name="step", command="python -m pipeline.bench step",
        columns=["backbone", "model", "params (M)", "params vs ours", "batch", "input", "CPU s/step",
                 "samples/CPU-s", "ours speed-up (CPU)", "wall s/step", "ours speed-up (wall)", "runs"],
        rows=rows, ratios=ratios,
        goals={"dit_ours_vs_diffusers_throughput": ">= 1.0", "unet_ours_vs_diffusers_throughput": ">= 1.0"},
        notes=["ours speed-up = diffusers s/step ÷ ours s/step (> 1: ours is faster); medians; headline ratio "
               "on the calling thread's CPU time (load-independent with 1 torch thread), wall time alongside; "
               f"fp32, {a.threads} torch thread(s), AdamW, ε-MSE with class labels, same inputs"],
        params=vars(a) | {"repeats": repeats})
