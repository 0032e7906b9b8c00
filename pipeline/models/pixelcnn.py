"""Gated, class-conditional PixelCNN over discrete code maps (van den Oord et al. 2016), the VQ-VAE(-2) prior.

Two stacks without a blind spot: the vertical stack at (i, j) sees every pixel of the rows above
(i' < i) within its receptive field; the horizontal stack sees the pixels to the left on the same row
(i, j' < j) plus the vertical stack at (i, j). Causality comes from padding and cropping, not masks:
the first layer's convolutions are shifted by one row (vertical) / one column (horizontal) so that the
pixel itself is excluded; later layers may include their own position since their inputs already
exclude it. Each layer is a gated activation tanh(W_f * x + V_f c) ⊙ σ(W_g * x + V_g c) where c is
a learned class embedding (a per-channel bias) and, for the bottom level of VQ-VAE-2, a spatial map of
the (given) top codes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import register


def _gate(a: torch.Tensor) -> torch.Tensor:
    f, g = a.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)  # gated activation unit


class GatedLayer(nn.Module):
    """One gated layer of both stacks; `first` excludes the current pixel (mask A), later layers include it."""

    def __init__(self, channels: int, kernel_size: int, first: bool, num_classes: int, cond_channels: int) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        c, self.k, self.first = channels, kernel_size, first
        self.kh = kernel_size // 2 + 1
        self.v_conv = nn.Conv2d(c, 2 * c, (self.kh, kernel_size))
        self.h_conv = nn.Conv2d(c, 2 * c, (1, self.kh))
        self.v_to_h = nn.Conv2d(2 * c, 2 * c, 1)
        self.h_out = nn.Conv2d(c, c, 1)
        self.class_bias = nn.Embedding(num_classes, 4 * c) if num_classes else None
        self.cond = nn.Conv2d(cond_channels, 4 * c, 1) if cond_channels else None

    def forward(self, v: torch.Tensor, h: torch.Tensor, y: torch.Tensor | None, cond: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = v.shape[-2:]
        shift = 1 if self.first else 0
        # vertical: rows i-kh..i-1 (first) or i-kh+1..i of the layer input, all columns within k//2
        v_feat = self.v_conv(F.pad(v, (self.k // 2, self.k // 2, self.kh - 1 + shift, 0)))[:, :, :height]
        # horizontal: columns j-kh..j-1 (first) or j-kh+1..j of the same row
        h_feat = self.h_conv(F.pad(h, (self.kh - 1 + shift, 0, 0, 0)))[:, :, :, :width] + self.v_to_h(v_feat)
        bias = 0.0
        if self.class_bias is not None and y is not None:
            bias = bias + self.class_bias(y)[:, :, None, None]
        if self.cond is not None and cond is not None:
            bias = bias + self.cond(cond)
        if torch.is_tensor(bias):
            bv, bh = bias.chunk(2, dim=1)
            v_feat, h_feat = v_feat + bv, h_feat + bh
        v_new, h_new = _gate(v_feat), self.h_out(_gate(h_feat))
        if self.first:
            return v_new, h_new
        return v + v_new, h + h_new  # residual connections (causal: same positions)


class GatedPixelCNN(nn.Module):
    """Autoregressive logits p(k_ij | k_<ij, class, cond) over a (B, H, W) map of `num_codes` codes."""

    def __init__(self, num_codes: int, num_classes: int = 0, channels: int = 64, num_layers: int = 6,
                 kernel_size: int = 5, cond_codes: int = 0) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.num_codes, self.num_classes = num_codes, num_classes
        self.embed = nn.Embedding(num_codes, channels)
        cond_channels = channels if cond_codes else 0
        if cond_codes:  # the conditioning codes are all known: a plain (non-causal) network reads them
            self.cond_embed = nn.Embedding(cond_codes, channels)
            self.cond_conv = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                           nn.Conv2d(channels, channels, 3, padding=1))
        self.layers = nn.ModuleList([GatedLayer(channels, kernel_size, i == 0, num_classes, cond_channels)
                                     for i in range(num_layers)])
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(),
                                  nn.Conv2d(channels, num_codes, 1))

    def condition(self, cond_codes: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """The spatial conditioning map of known codes (B, h, w), resized (nearest) to `size`."""
        c = self.cond_conv(self.cond_embed(cond_codes).permute(0, 3, 1, 2))
        return F.interpolate(c, size=tuple(size), mode="nearest")

    def forward_embedded(self, x: torch.Tensor, y: torch.Tensor | None = None,
                         cond: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, num_codes, H, W) from embedded codes x (B, channels, H, W) (for gradient checks)."""
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, y, cond)
        return self.head(h)

    def forward(self, codes: torch.Tensor, y: torch.Tensor | None = None,
                cond_codes: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, H, W) long -> logits (B, num_codes, H, W); logits at (i, j) depend on codes before (i, j)."""
        cond = self.condition(cond_codes, codes.shape[-2:]) if cond_codes is not None else None
        return self.forward_embedded(self.embed(codes).permute(0, 3, 1, 2), y, cond)


@register("pixelcnn")
class CodePrior(nn.Module):
    """A PixelCNN per latent level: level 0 (VQ-VAE's codes, or VQ-VAE-2's top) is class-conditional;
    every later level (VQ-VAE-2's bottom) is also conditioned on the codes of the level before it.

    `num_codes` lists the codebook size per level (filled in from the VQ autoencoder by the prior stage).
    """

    def __init__(self, num_codes: Sequence[int], num_classes: int = 0, channels: int = 64, num_layers: int = 6,
                 kernel_size: int = 5) -> None:
        super().__init__()
        self.codes_per_level = [int(k) for k in num_codes]
        self.num_classes = num_classes
        self.levels = nn.ModuleList([
            GatedPixelCNN(k, num_classes, channels, num_layers, kernel_size,
                          cond_codes=self.codes_per_level[i - 1] if i else 0)
            for i, k in enumerate(self.codes_per_level)])

    def forward(self, codes: list[torch.Tensor], y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Logits per level, each (B, K_l, H_l, W_l), teacher-forced on the given codes."""
        return [net(c, y, codes[i - 1] if i else None) for i, (net, c) in enumerate(zip(self.levels, codes,
                                                                                        strict=True))]

    @torch.no_grad()
    def sample(self, y: torch.Tensor, shapes: Sequence[Sequence[int]], temperature: float = 1.0,
               generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Codes per level (B, H_l, W_l), drawn pixel by pixel in raster order, level by level."""
        out: list[torch.Tensor] = []
        for i, (net, (height, width)) in enumerate(zip(self.levels, shapes, strict=True)):
            codes = torch.zeros(len(y), height, width, dtype=torch.long, device=y.device)
            cond = out[i - 1] if i else None
            for r in range(height):
                for c in range(width):
                    logits = net(codes, y, cond)[:, :, r, c].float() / temperature
                    probs = torch.softmax(logits, dim=-1)
                    codes[:, r, c] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            out.append(codes)
        return out


__all__ = ["CodePrior", "GatedPixelCNN"]
