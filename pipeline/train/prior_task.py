"""The prior stage's task: a PixelCNN learns p(codes | class) of a frozen VQ autoencoder's codes.

Each batch of images is encoded to code indices by the VQ-VAE (eval mode: its codebook does not
move), and the prior is trained by cross-entropy on them, teacher-forced: for VQ-VAE-2 the top map
p(top | class) and the bottom map p(bottom | top, class) at once (one loss, the mean over all codes).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import build_model


def code_nll(logits: list[torch.Tensor], codes: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Cross-entropy in nats: (mean over every code of every level, [mean per level])."""
    per_level = [F.cross_entropy(lg.float(), c, reduction="none").flatten(1) for lg, c in zip(logits, codes,
                                                                                                strict=True)]
    total = torch.cat(per_level, 1).mean()
    return total, [p.mean() for p in per_level]


def prior_args(spec_args: dict[str, Any], codes_per_level: list[int], num_classes: int) -> dict[str, Any]:
    """The prior's constructor arguments: the spec's, with `num_codes` / `num_classes` taken from the data."""
    args = dict(spec_args)
    for key, value in (("num_codes", codes_per_level), ("num_classes", num_classes)):
        if key in args and args[key] != value:
            raise ValueError(f"model.args.{key}={args[key]!r} does not match the VQ autoencoder / data ({value!r}); "
                             "leave it out, the prior stage fills it in")
        args[key] = value
    return args


class PriorTask:
    """Cross-entropy of a `pixelcnn` prior on the codes of the frozen VQ autoencoder `vq`.

    `data` (``autoencoder``: its registry URI, ``code_shapes``: [h, w] per level) is exported with the
    weights, so a sampler finds the decoder and the map sizes.
    """

    def __init__(self, stage: dict[str, Any], vq: nn.Module, vq_meta: dict[str, Any], num_classes: int,
                 data: dict[str, Any] | None = None):
        if not hasattr(vq, "encode_codes"):
            raise ValueError(f"the prior's input model '{vq_meta.get('name')}' has no discrete codes "
                             "(expected vq_vae or vq_vae2)")
        self.vq = vq.eval().requires_grad_(False)
        self.vq_meta = vq_meta
        self.model_spec = stage["model"]
        self.num_classes = num_classes
        self.data = dict(data or {})  # the autoencoder's registry URI and the code map shapes, for sampling
        self.args = prior_args(self.model_spec.get("args", {}), list(vq.codes_per_level), num_classes)

    def build_model(self) -> nn.Module:
        return build_model(self.model_spec["name"], **self.args)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The VQ autoencoder's code maps of images x."""
        if next(self.vq.parameters()).device != x.device:
            self.vq = self.vq.to(x.device)
        return self.vq.encode_codes(x.float())

    def loss(self, model, batch, gen):
        codes = self.codes(batch["image"])
        nll, per_level = code_nll(model(codes, batch["label"]), codes)
        parts = {f"bits_per_code_{name}": v / math.log(2) for name, v in zip(self.vq.level_names, per_level,
                                                                            strict=True)}
        return nll, {"bits_per_code": nll.detach() / math.log(2), **parts}

    def model_recipe(self):
        return self.model_spec["name"], self.args

    def export_extra(self):
        return {"kind": "prior", "num_classes": self.num_classes, "levels": list(self.vq.level_names), **self.data}
