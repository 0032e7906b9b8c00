"""Sampling from registered generators and measuring them with the pipeline's own classifier.

FID and KID are torchmetrics' implementations on the features of the pipeline's trained
classifier (no downloaded Inception weights); class accuracy is the share of class-conditional
samples the classifier assigns to the requested class.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline.diffusion import SamplerOptions, Schedule, classifier_free, run_sampler

log = logging.getLogger("pipeline.eval")


@dataclass
class Generator:
    """A diffusion model with what it needs to produce pixels."""

    model: nn.Module
    meta: dict[str, Any]
    decoder: nn.Module | None = None

    @property
    def extra(self) -> dict[str, Any]:
        return self.meta["extra"]

    @property
    def schedule(self) -> Schedule:
        d = self.extra["diffusion"]
        return Schedule.make(d.get("schedule", "cosine"), int(d.get("timesteps", 1000)))

    @property
    def num_classes(self) -> int:
        return int(self.extra["num_classes"])

    @property
    def default_steps(self) -> list[int] | int:
        return self.extra.get("sampling_timesteps") or 50


@torch.no_grad()
def generate(gen: Generator, labels: torch.Tensor, *, steps: int | list[int] | None = None,
             guidance: float = 0.0, sampler: str = "ddim", eta: float = 0.0, seed: int = 0,
             batch_size: int = 250, cond_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
             | None = None, classifier_scale: float = 0.0, langevin_steps: int = 3,
             langevin_step_ratio: float = 0.5) -> torch.Tensor:
    """Class-conditional samples in pixel space (N, C, H, W), values roughly in [-1, 1].

    ``sampler`` names a sampler of :data:`pipeline.diffusion.SAMPLERS` (ddim | ancestral | langevin);
    Langevin (eq. 32-33) takes ``langevin_steps`` steps with δ = ``langevin_step_ratio``·σ² per level.

    Classifier guidance: ``cond_fn(x, t, y) = ∇_x log f(y | x_t)`` (see
    :func:`pipeline.eval.guidance.classifier_cond_fn`) scaled by ``classifier_scale``; ancestral sampling
    shifts the mean by scale·Σ·grad (Algorithm 1, fig. 2-7), DDIM uses eq. 38.
    """
    steps = steps if steps is not None else gen.default_steps
    if gen.extra.get("distilled_guidance") and guidance:
        log.warning("guidance %.2f ignored: this model has guidance %.2f distilled into it",
                    guidance, gen.extra["distilled_guidance"])
        guidance = 0.0
    d = gen.extra["diffusion"]
    base = gen.schedule
    shape = tuple(gen.extra["sample_shape"])
    g = torch.Generator().manual_seed(seed)
    outs = []
    for i in range(0, len(labels), batch_size):
        y = labels[i:i + batch_size]
        if guidance:
            fn = classifier_free(lambda x, t, yy: gen.model(x, t, y=yy), y, gen.num_classes, guidance)
        else:
            fn = (lambda yy: (lambda x, t: gen.model(x, t, y=yy)))(y)
        xT = torch.randn((len(y), *shape), generator=g)
        guide = (lambda yy: (lambda x, t: cond_fn(x, t, yy)))(y) if cond_fn is not None else None
        if "consistency" in gen.extra:  # a consistency model (eq. 44): `steps` = its number of steps
            from pipeline.diffusion.consistency import generator_timesteps, sample_consistency

            c = gen.extra["consistency"]
            z = sample_consistency(fn, base, xT, generator_timesteps(c, steps), sigma_min_index=c["sigma_min_index"],
                                   parameterization=d.get("parameterization", "v"), sigma_data=c["sigma_data"],
                                   generator=g)
        else:
            opts = SamplerOptions(parameterization=d.get("parameterization", "eps"),
                                  learn_sigma=bool(d.get("learn_sigma", False)), eta=eta,
                                  langevin_steps=langevin_steps, langevin_step_ratio=langevin_step_ratio,
                                  generator=g, cond_fn=guide, guidance_scale=classifier_scale)
            z = run_sampler(sampler, fn, base, xT, steps, opts)
        if gen.decoder is not None:
            z = gen.decoder.decode(z / float(gen.extra.get("latent_scale", 1.0)))
        outs.append(z.float())
    return torch.cat(outs)


class ClassifierFeatures(nn.Module):
    """The trained classifier's pooled features, as a torchmetrics feature extractor."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = int(classifier.feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x.float()).double()


@torch.no_grad()
def classify(classifier: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted labels of clean images."""
    preds = [classifier(images[i:i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)]
    return torch.cat(preds)


@torch.no_grad()
def sample_metrics(fake: torch.Tensor, labels: torch.Tensor, real: torch.Tensor,
                   classifier: nn.Module) -> dict[str, float]:
    """FID, KID (mean ± std) on classifier features, and class accuracy of the samples."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    feats = ClassifierFeatures(classifier)
    fid = FrechetInceptionDistance(feature=feats, normalize=True)
    subset = min(len(fake), len(real), 200)
    kid = KernelInceptionDistance(feature=feats, normalize=True, subset_size=subset, subsets=20)
    fake = fake.clamp(-1, 1)
    for chunk in real.split(500):
        fid.update(chunk, real=True)
        kid.update(chunk, real=True)
    for chunk in fake.split(500):
        fid.update(chunk, real=False)
        kid.update(chunk, real=False)
    kid_mean, kid_std = kid.compute()
    acc = (classify(classifier, fake) == labels).float().mean()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
            "class_accuracy": float(acc)}


def image_grid(images: torch.Tensor, nrow: int, scale: int = 2) -> bytes:
    """PNG bytes of a grid of images in [-1, 1] (N, C, H, W), `nrow` images per row."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    n, c, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = x[i].transpose(1, 2, 0)
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
