"""Noise-aware classifier: the U-Net encoder half with a pooled linear head.

Used for classifier guidance (trained on noisy x_t) and, with t=None, as a feature extractor
for FID/KID-style metrics on clean images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.models import register
from pipeline.models.layers import TimestepEmbedder, as_timesteps, group_norm
from pipeline.models.unet import build_encoder


@register("classifier")
class NoisyClassifier(nn.Module):
    """``forward(x, t=None) -> logits (B, num_classes)``; ``features(x, t=None) -> (B, feature_dim)``.

    ``t=None`` means clean images (t = 0).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        model_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (),
        num_heads: int = 4,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        emb_dim = 4 * model_channels
        self.time_embed = TimestepEmbedder(emb_dim, frequency_size=model_channels)
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.input_blocks, self.middle_block, _, ch = build_encoder(
            model_channels, channel_mult, num_res_blocks, attention_resolutions, num_heads,
            emb_dim, None, dropout, use_checkpoint,
        )
        self.feature_dim = ch
        self.out_norm = nn.Sequential(group_norm(ch), nn.SiLU())
        self.head = nn.Linear(ch, num_classes)

    def features(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """Globally average-pooled final encoder features, (B, feature_dim)."""
        emb = self.time_embed(as_timesteps(t, x.shape[0], x.device))
        h = self.conv_in(x)
        for block in self.input_blocks:
            h = block(h, emb)
        h = self.middle_block(h, emb)
        return self.out_norm(h).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,) or None -> logits (B, num_classes)."""
        return self.head(self.features(x, t))
