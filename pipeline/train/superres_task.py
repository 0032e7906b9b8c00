"""Cascaded diffusion (notes section 2.6.1): a base model at low resolution and super-resolution stages.

A `superres` stage trains at its own resolution `size`, on training images area-downsampled from the
data resolution. With `low_res` set it is a super-resolution model: the U-Net input is the noisy
high-res image concatenated (channels) with the bicubic upsampling of the low-res image, which is
corrupted by noise conditioning augmentation (Gaussian noise or blur, :mod:`pipeline.diffusion.cond_aug`);
the discretised augmentation level reaches the model through its class embedding. Without `low_res`
it is the cascade's base: a class-conditional DDPM at `size`. With ``conditioning: text`` (Imagen, notes
2.6.3) every stage is also conditioned on the caption through a text encoder (cross-attention, eq. 47-48),
captions dropped to "" at rate ``diffusion.label_dropout`` for classifier-free guidance (eq. 40); the base
then takes no class labels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pipeline.diffusion import condition_dropout, drop_labels, sample_ddim
from pipeline.diffusion.cond_aug import (
    augment,
    downsample,
    from_residual,
    level_index,
    random_levels,
    to_residual,
    upsample_bicubic,
)
from pipeline.models import build_model
from pipeline.train.tasks import make_schedule, on_device, spec_diffusion_loss


def sr_inputs(images: Tensor, size: int, low_res: int, kind: str, levels: list[float],
              gen: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Training inputs of a super-resolution stage from full-resolution ``images``.

    Returns ``(target, cond, level_idx)``: the high-res target (B, C, size, size), the conditioning
    (B, C, size, size) = bicubic upsampling of the augmented low-res image, and each sample's level index.
    """
    target = downsample(images, size)
    low = downsample(images, low_res)
    idx, values = random_levels(len(images), levels, gen, images.device)
    noise = torch.randn(low.shape, generator=gen, device=low.device, dtype=low.dtype) if kind == "noise" else None
    return target, upsample_bicubic(augment(low, kind, values, noise), size), idx


def sr_condition(low: Tensor, size: int, kind: str, levels: list[float], level: float,
                 gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Sampling-time conditioning: ``low`` augmented at the chosen ``level`` (snapped), upsampled; level indices."""
    i = level_index(level, levels)
    values = torch.full((len(low),), float(levels[i]), device=low.device)
    noise = torch.randn(low.shape, generator=gen, device=low.device, dtype=low.dtype) if kind == "noise" else None
    cond = upsample_bicubic(augment(low, kind, values, noise), size)
    return cond, torch.full((len(low),), i, dtype=torch.long, device=low.device)


def sr_model_args(model_args: dict[str, Any], channels: int, low_res: int | None, num_levels: int,
                  num_classes: int | None) -> dict[str, Any]:
    """The U-Net's arguments with the channels and embeddings the stage implies filled in.

    Super-resolution: ``in_channels = 2C`` (noisy image ‖ upsampled low-res), ``out_channels = C`` and one
    class-like embedding per augmentation level. Base: ``in_channels = C`` and the data's classes (None: a
    text-conditioned base, no class embedding).
    """
    implied = {"in_channels": 2 * channels if low_res else channels, "out_channels": channels,
               "num_classes": num_levels if low_res else num_classes}
    for k, v in implied.items():
        if k in model_args and model_args[k] != v:
            raise ValueError(f"model.args.{k}={model_args[k]} contradicts the stage (it must be {v}); "
                             "leave it out and the stage fills it in")
    return {**model_args, **implied}


class SuperResTask:
    """DDPM training of one cascade stage (base or super-resolution) at resolution ``stage['size']``."""

    def __init__(self, stage: dict[str, Any], num_classes: int, data: dict[str, Any],
                 text_encoder: dict[str, Any] | None = None):
        self.size = int(stage["size"])
        self.text_encoder = text_encoder if stage.get("conditioning") == "text" else None
        if stage.get("conditioning") == "text" and not text_encoder:
            raise ValueError("a text-conditioned superres stage needs its resolved text encoder spec")
        self.low_res = stage.get("low_res")
        self.residual_scale = stage.get("residual_scale") if self.low_res else None
        aug = stage.get("augment") or {}
        self.aug_kind = aug.get("kind", "noise")
        self.levels = [float(v) for v in aug.get("levels", [0.0])]
        self.sample_level = float(aug.get("sample_level", 0.0))
        self.sampling = {k: v for k, v in (stage.get("sampling") or {}).items()
                         if k in ("steps", "eta", "guidance", "dynamic_threshold")}
        self.diffusion = stage.get("diffusion", {})
        self.schedule = make_schedule(self.diffusion)
        self.num_classes = num_classes
        self.data = data  # channels, cascade_input (URI of the stage producing low_res)
        self.model_spec = {"name": stage["model"]["name"],
                           "args": sr_model_args(stage["model"].get("args", {}), int(data["channels"]),
                                                 self.low_res, len(self.levels),
                                                 None if self.text_encoder else num_classes)}

    def build_model(self) -> nn.Module:
        name, args = self.model_recipe()
        return build_model(name, **args)

    def inputs(self, images: Tensor, labels: Tensor, gen: torch.Generator | None
               ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(x0, conditioning or None, class-like index): x0 is the image at ``size`` (or, with ``residual_scale``,
        its residual over the conditioning); the index is the augmentation level, or the (dropped) label
        (None for a text-conditioned base)."""
        if self.low_res:
            target, cond, idx = sr_inputs(images, self.size, int(self.low_res), self.aug_kind, self.levels, gen)
            if self.residual_scale:
                target = to_residual(target, cond, float(self.residual_scale))
            return target, cond, idx
        if self.text_encoder:
            return downsample(images, self.size), None, None
        drop = self._drop(len(labels), labels.device, gen)
        return downsample(images, self.size), None, drop_labels(labels, drop, self.num_classes)

    def _drop(self, n: int, device: torch.device, gen: torch.Generator | None) -> Tensor:
        """Which conditions to replace by ∅ for classifier-free guidance (eq. 40)."""
        return condition_dropout(n, self.diffusion.get("label_dropout", 0.1), device, gen)

    def loss(self, model, batch, gen):
        x0, cond, y = self.inputs(batch["image"], batch["label"], gen)
        self.schedule = on_device(self.schedule, x0.device)
        captions = None
        if self.text_encoder:
            from pipeline.train.text_task import batch_captions, drop_captions

            captions = drop_captions(batch_captions(batch, "conditioning: text"), self._drop(len(x0), x0.device, gen))
        return spec_diffusion_loss(denoiser(model, cond, y, captions=captions), self.schedule, self.diffusion,
                                   x0, gen)

    def model_recipe(self):
        if self.text_encoder:
            return "text_conditioned", {"denoiser": self.model_spec, "text_encoder": self.text_encoder,
                                        "class_labels": bool(self.low_res)}
        return self.model_spec["name"], self.model_spec["args"]

    def export_extra(self):
        return {"kind": "superres", "diffusion": self.diffusion, "num_classes": self.num_classes,
                "size": self.size, "low_res": self.low_res, "residual_scale": self.residual_scale,
                "augment": {"kind": self.aug_kind, "levels": self.levels, "sample_level": self.sample_level},
                "sampling": self.sampling,
                "sample_shape": [int(self.data["channels"]), self.size, self.size], "latent_scale": 1.0,
                "conditioning": "text" if self.text_encoder else "class", **self.data}


def denoiser(model: nn.Module, cond: Tensor | None, y: Tensor | None, **text: Any):
    """``fn(x_t, t)`` of a cascade stage: the U-Net on x_t (‖ the conditioning) with class-like index ``y``
    (and, for a text-conditioned stage, ``captions=`` or ``context=``)."""
    text = {k: v for k, v in text.items() if v is not None}
    if cond is None:
        return lambda xt, tt: model(xt, tt, y=y, **text)
    return lambda xt, tt: model(torch.cat([xt, cond], dim=1), tt, y=y, **text)


def guided(fn_cond, fn_null, w: float):
    """Classifier-free guidance (eq. 40): (1 + w)·f(x, t, c) − w·f(x, t, ∅); w = 0 is the conditional model.
    Linear in the output, so it holds for ε, v and x₀ outputs alike."""
    if not w:
        return fn_cond
    return lambda xt, tt: (1.0 + w) * fn_cond(xt, tt) - w * fn_null(xt, tt)


@torch.no_grad()
def sample_stage(model: nn.Module, meta: dict[str, Any], *, n: int, steps: int, seed: int,
                 labels: Tensor | None = None, low: Tensor | None = None, level: float = 0.0,
                 eta: float = 0.0, captions: list[str] | None = None, guidance: float = 0.0,
                 threshold: float | None = None, batch_size: int = 256) -> Tensor:
    """DDIM samples (eq. 43) of one cascade stage: the base given ``labels`` (or ``captions``), or SR given
    ``low`` at ``level`` (and ``captions``); ``guidance`` is the classifier-free weight w (eq. 40) on the label
    (base) or caption (text stages); ``threshold`` the dynamic-thresholding quantile."""
    extra = meta["extra"]
    d = extra["diffusion"]
    sched = make_schedule(d)
    c, size = int(extra["channels"]), int(extra["size"])
    text = extra.get("conditioning") == "text"
    if text and (captions is None or len(captions) != n):
        raise ValueError(f"a text-conditioned cascade stage samples from {n} captions, got "
                         f"{None if captions is None else len(captions)}")
    g = torch.Generator().manual_seed(seed)
    outs = []
    for i in range(0, n, batch_size):
        m = min(batch_size, n - i)
        y_null, ctx, ctx_null = None, None, None
        if extra.get("low_res"):
            aug = extra["augment"]
            cond, y = sr_condition(low[i:i + m], size, aug["kind"], aug["levels"], level, g)
            y_null = y
        elif text:
            cond, y = None, None
        else:
            cond = None
            y = labels[i:i + m] if labels is not None else torch.full((m,), int(extra["num_classes"]))
            y_null = torch.full((m,), int(extra["num_classes"]))
        if text:
            ctx, _ = model.encode_text(captions[i:i + m])
            ctx_null, _ = model.encode_text([""] * m)
        w = guidance if (text or not extra.get("low_res")) else 0.0  # class SR stages have no ∅ condition
        fn = guided(denoiser(model, cond, y, context=ctx), denoiser(model, cond, y_null, context=ctx_null), w)
        xT = torch.randn((m, c, size, size), generator=g)
        x = sample_ddim(fn, sched, xT, steps, eta=eta, threshold=threshold,
                        parameterization=d.get("parameterization", "eps"), generator=g)
        rs = extra.get("residual_scale")
        outs.append(from_residual(x, cond, float(rs)) if rs and cond is not None else x.clamp(-1, 1))
    return torch.cat(outs)
