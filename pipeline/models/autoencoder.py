"""Convolutional KL-regularised VAE, the first stage of a latent diffusion model (notes 1.2, eq. 6-7)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.models import register
from pipeline.models.layers import Downsample, ResBlock, SpatialAttention, Upsample, group_norm

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class _Encoder(nn.Module):
    def __init__(
        self, in_channels: int, base_channels: int, channel_mult: Sequence[int], num_res_blocks: int,
        out_channels: int,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 3, padding=1)]
        ch = base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(ch, base_channels * mult))
                ch = base_channels * mult
            if level != len(channel_mult) - 1:
                layers.append(Downsample(ch))
        layers += [ResBlock(ch), SpatialAttention(ch, num_heads=1), ResBlock(ch)]
        layers += [group_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _Decoder(nn.Module):
    def __init__(
        self, latent_channels: int, base_channels: int, channel_mult: Sequence[int], num_res_blocks: int,
        out_channels: int,
    ) -> None:
        super().__init__()
        ch = base_channels * channel_mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, ch, 3, padding=1)]
        layers += [ResBlock(ch), SpatialAttention(ch, num_heads=1), ResBlock(ch)]
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResBlock(ch, base_channels * mult))
                ch = base_channels * mult
            if level:
                layers.append(Upsample(ch))
        layers += [group_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


@register("kl_vae")
class KLAutoencoder(nn.Module):
    """KL-regularised convolutional VAE with a diagonal Gaussian posterior q(z|x) = N(mean, exp(logvar)).

    The latent has ``latent_channels`` channels at 1/``downsample_factor`` of the input resolution,
    ``downsample_factor = 2 ** (len(channel_mult) - 1)``. The decoder output is an unbounded
    regression of pixels in [-1, 1] (or Bernoulli logits, depending on the loss used).
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        latent_channels: int = 4,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        self.encoder = _Encoder(in_channels, base_channels, channel_mult, num_res_blocks, 2 * latent_channels)
        self.decoder = _Decoder(latent_channels, base_channels, channel_mult, num_res_blocks, in_channels)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) -> (mean, logvar), each (B, latent_channels, H/f, W/f)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, latent_channels, h, w) -> x_hat: (B, C, h*f, w*f)."""
        return self.decoder(z)

    @staticmethod
    def reparameterize(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I) (notes 1.2.4, reparameterisation trick)."""
        return torch.addcmul(mean, torch.exp(0.5 * logvar), torch.randn_like(mean))

    def forward(
        self, x: torch.Tensor, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (x_hat, mean, logvar); decodes a posterior sample, or the mean if ``sample=False``."""
        mean, logvar = self.encode(x)
        z = self.reparameterize(mean, logvar) if sample else mean
        return self.decode(z), mean, logvar


__all__ = ["KLAutoencoder"]
