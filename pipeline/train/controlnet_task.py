"""ControlNet training (notes section 2.7.2, eq. 50) over a frozen registered pixel-space U-Net.

The base diffusion model is fetched from the registry (like DistillTask's teacher) and frozen; the
trainable copy of its encoder, joined by zero convolutions, learns to follow Canny edge maps of the
training images, computed from each batch here (:func:`pipeline.eval.edges.canny_edges`). The training
objective is the base model's own DDPM loss with the control added, so at step 0 the model is exactly
the base model.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.diffusion import classifier_free, condition_dropout, drop_labels, sample_ddim
from pipeline.eval.edges import canny_edges
from pipeline.models import ControlNet, UNet
from pipeline.train.tasks import make_schedule, on_device, spec_diffusion_loss


def edge_control(images: Tensor, edges: dict[str, Any]) -> Tensor:
    """The control image: (B, 1, H, W) float Canny edge map (1 on edges, 0 elsewhere) of images in [-1, 1]."""
    maps = canny_edges(images, sigma=float(edges.get("sigma", 1.0)),
                       low_threshold=float(edges.get("low_threshold", 0.1)),
                       high_threshold=float(edges.get("high_threshold", 0.2)))
    return maps[:, None].to(images.device, images.dtype)


def control_from_image(path: str | Path, meta: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """The control map a ControlNet takes from a picture, as in training: the picture resized to the model's
    image size (grey or RGB like its training images, in [-1, 1]) and its Canny edges with the model's
    edge settings. Returns ``(edge map (1, 1, H, W), resized picture (1, C, H, W))``."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = meta["extra"]["sample_shape"]
    try:
        with Image.open(path) as img:
            img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"--control {path}: not a readable image ({exc})") from None
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()) / 127.5 - 1.0
    x = x[None, None] if c == 1 else x.permute(2, 0, 1)[None]
    return edge_control(x, meta["extra"].get("edges", {})), x


def check_base(meta: dict[str, Any], source: str) -> None:
    """A ControlNet base must be a pixel-space class-conditional-or-not ``unet`` diffusion model."""
    if meta.get("name") != "unet":
        raise ValueError(f"ControlNet needs a U-Net base model; {source} is a {meta.get('name')!r}")
    if meta["extra"].get("autoencoder"):
        raise ValueError(f"ControlNet here conditions pixel-space models; {source} is a latent diffusion model")


def control_labels(y: Tensor, num_classes: int, class_labels: bool, dropout: float,
                   gen: torch.Generator | None = None) -> Tensor | None:
    """The class input of a ControlNet step: None for an unconditional base, the null label ``num_classes``
    without ``class_labels``, else the labels with classifier-free dropout at rate ``dropout``."""
    if not num_classes:
        return None
    if not class_labels:
        return torch.full_like(y, num_classes)
    return drop_labels(y, condition_dropout(len(y), dropout, y.device, gen), num_classes)


class ControlNetTask:
    """ControlNet on edge maps; the base U-Net (``base``, with its export ``base_meta``) stays frozen."""

    def __init__(self, stage: dict[str, Any], base: nn.Module, base_meta: dict[str, Any]):
        check_base(base_meta, "the base")
        if not isinstance(base, UNet):
            raise ValueError(f"ControlNet needs a UNet base model, got {type(base).__name__}")
        self.base = base.eval().requires_grad_(False)
        self.base_meta = base_meta
        self.edges = dict(stage.get("edges") or {})
        self.diffusion = dict(base_meta["extra"]["diffusion"])
        self.num_classes = int(base_meta["extra"].get("num_classes", 0))
        self.class_labels = bool(stage.get("class_labels", False))
        self.schedule = make_schedule(self.diffusion)

    def build_model(self) -> nn.Module:
        return ControlNet(copy.deepcopy(self.base), control_channels=1)

    def loss(self, model, batch, gen):
        x0, y = batch["image"], batch["label"]
        control = edge_control(x0, self.edges)
        self.schedule = on_device(self.schedule, x0.device)
        y = control_labels(y, self.num_classes, self.class_labels, self.diffusion.get("label_dropout", 0.1), gen)
        return spec_diffusion_loss(lambda xt, tt: model(xt, tt, control, y=y), self.schedule, self.diffusion, x0, gen)

    def model_recipe(self):
        return "controlnet_unet", {"base": self.base_meta["args"], "control_channels": 1}

    def export_extra(self):
        return {**self.base_meta["extra"], "kind": "controlnet", "edges": self.edges,
                "class_labels": self.class_labels}


@torch.no_grad()
def sample_controlled(model: nn.Module, meta: dict[str, Any], labels: Tensor, control: Tensor | None, *,
                      steps: int, guidance: float = 0.0, eta: float = 0.0, seed: int = 0) -> Tensor:
    """DDIM samples (eq. 43) of a ControlNet given ``control`` maps, or of a plain U-Net when ``control`` is None.

    Classifier-free guidance (eq. 40) on the class label when ``guidance`` > 0; the same seed gives the
    same x_T for both, so a ControlNet and its base are compared from the same noise.
    """
    extra = meta["extra"]
    d = extra["diffusion"]
    n_cls = int(extra.get("num_classes", 0))

    def fn_y(x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        if control is None:
            return model(x, t, y=y)
        c = control if len(x) == len(control) else torch.cat([control] * (len(x) // len(control)))
        return model(x, t, c, y=y)

    def conditional(x: Tensor, t: Tensor) -> Tensor:
        return fn_y(x, t, labels if n_cls else None)

    fn = classifier_free(fn_y, labels, n_cls, guidance) if guidance and n_cls else conditional  # eq. 40
    g = torch.Generator().manual_seed(seed)
    xT = torch.randn((len(labels), *extra["sample_shape"]), generator=g)
    return sample_ddim(fn, make_schedule(d), xT, steps, eta=eta, parameterization=d.get("parameterization", "eps"),
                       generator=g).clamp(-1, 1)
