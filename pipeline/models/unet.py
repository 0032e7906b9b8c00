"""Time-conditional U-Net (notes section 2.7.1) with optional class labels and cross-attention (eq. 47-48)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.models import register
from pipeline.models.layers import (
    Downsample,
    ResBlock,
    SpatialAttention,
    TimestepEmbedder,
    Upsample,
    group_norm,
    zero_module,
)


class EmbedSequential(nn.ModuleList):
    """A sequence of ResBlocks / attention blocks / resamplers fed with (x, emb, context).

    With ``use_checkpoint`` the whole sequence is recomputed in the backward pass
    (``torch.utils.checkpoint`` with ``use_reentrant=False``) when gradients are enabled.
    """

    def __init__(self, *modules: nn.Module, use_checkpoint: bool = False) -> None:
        super().__init__(modules)
        self.use_checkpoint = use_checkpoint

    def _run(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialAttention):
                x = layer(x, context)
            else:
                x = layer(x)
        return x

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._run, x, emb, context, use_reentrant=False)
        return self._run(x, emb, context)


def build_encoder(
    model_channels: int,
    channel_mult: Sequence[int],
    num_res_blocks: int,
    attention_resolutions: Sequence[int],
    num_heads: int,
    emb_dim: int,
    context_dim: int | None,
    dropout: float,
    use_checkpoint: bool,
) -> tuple[nn.ModuleList, EmbedSequential, list[int], int]:
    """Down stack + middle block shared by the U-Net, the noisy classifier and ControlNet.

    Returns ``(input_blocks, middle_block, skip_channels, channels)``: one skip connection is taken
    after the input conv (channel count ``skip_channels[0]``, not part of ``input_blocks``) and after
    every element of ``input_blocks``.
    """
    input_blocks = nn.ModuleList()
    skip_channels = [model_channels]
    ch = model_channels
    ds = 1  # current downsampling factor
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, model_channels * mult, emb_dim, dropout)]
            ch = model_channels * mult
            if ds in attention_resolutions:
                layers.append(SpatialAttention(ch, num_heads, context_dim))
            input_blocks.append(EmbedSequential(*layers, use_checkpoint=use_checkpoint))
            skip_channels.append(ch)
        if level != len(channel_mult) - 1:
            input_blocks.append(EmbedSequential(Downsample(ch), use_checkpoint=use_checkpoint))
            skip_channels.append(ch)
            ds *= 2
    middle_block = EmbedSequential(
        ResBlock(ch, ch, emb_dim, dropout),
        SpatialAttention(ch, num_heads, context_dim),
        ResBlock(ch, ch, emb_dim, dropout),
        use_checkpoint=use_checkpoint,
    )
    return input_blocks, middle_block, skip_channels, ch


@register("unet")
class UNet(nn.Module):
    """Denoising U-Net: ``forward(x, t, y=None, context=None) -> out``.

    * Timestep: sinusoidal features of ``t`` (float or long, shape (B,)) then an MLP.
    * Classes (``num_classes``): label embedding added to the time embedding; index ``num_classes``
      (or ``y=None``) is the null label used for classifier-free guidance.
    * Context (``context_dim``): cross-attention to a (B, M, context_dim) sequence at every attention
      resolution and in the middle block (eq. 47-48).
    * Self-attention at the downsampling factors listed in ``attention_resolutions``.
    * ``out_channels`` defaults to ``in_channels`` and is doubled when ``learn_sigma``.
    The final convolution is zero-initialised, so the output is exactly zero at initialisation.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int = 64,
        out_channels: int | None = None,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (2,),
        num_heads: int = 4,
        num_classes: int | None = None,
        context_dim: int | None = None,
        learn_sigma: bool = False,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        if learn_sigma:
            out_channels *= 2
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.learn_sigma = learn_sigma
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        emb_dim = 4 * model_channels

        self.time_embed = TimestepEmbedder(emb_dim, frequency_size=model_channels)
        # Index num_classes is the "no label" embedding (classifier-free guidance).
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.input_blocks, self.middle_block, skip_channels, ch = build_encoder(
            model_channels, channel_mult, num_res_blocks, attention_resolutions, num_heads,
            emb_dim, context_dim, dropout, use_checkpoint,
        )

        self.output_blocks = nn.ModuleList()
        ds = self.downsample_factor
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers: list[nn.Module] = [
                    ResBlock(ch + skip_channels.pop(), model_channels * mult, emb_dim, dropout)
                ]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(SpatialAttention(ch, num_heads, context_dim))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers, use_checkpoint=use_checkpoint))

        self.out = nn.Sequential(
            group_norm(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1))
        )

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Time (+ class) embedding, (B, 4 * model_channels)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(t)
        if self.label_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_embed(y)
        return emb

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,), y: (B,) long or None, context: (B, M, context_dim) or None."""
        return self.forward_with_residuals(x, t, y, context)

    def forward_with_residuals(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        skip_residuals: Sequence[torch.Tensor] | None = None,
        middle_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Forward pass with optional residuals added to every skip connection and to the middle
        block output (used by ControlNet, eq. 50)."""
        f = self.downsample_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"UNet input size {tuple(x.shape[-2:])} must be divisible by {f}")
        emb = self.embed(x, t, y)
        h = self.conv_in(x)
        skips = [h]
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if skip_residuals is not None:
            skips = [s + r for s, r in zip(skips, skip_residuals, strict=True)]
        if middle_residual is not None:
            h = h + middle_residual
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)


__all__ = ["UNet", "EmbedSequential", "build_encoder"]
