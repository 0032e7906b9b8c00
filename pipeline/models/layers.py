"""Building blocks shared by the convolutional backbones (VAE, U-Net, classifier, ControlNet) and the DiT.

Everything here is a plain ``torch.nn.Module`` or function; nothing knows about training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero and return it (zero-initialised output layers)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int, max_groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm whose group count divides ``channels`` (largest power of two <= ``max_groups``).

    This makes tiny test sizes (e.g. 16 or 48 channels) work with the usual 32-group setting.
    """
    groups = math.gcd(max_groups, channels)
    return nn.GroupNorm(groups, channels, eps=eps)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of the (possibly fractional) timestep ``t``.

    Args:
        t: (B,) float or integer tensor (a 0-dim tensor is broadcast to one row).
        dim: feature size; odd sizes are padded with a zero column.
    Returns:
        (B, dim) float32 tensor ``[cos(t * w_k), sin(t * w_k)]`` with ``w_k = max_period^(-k/half)``.
    Computed in float32 on ``t``'s device (no host-device synchronisation); callers cast to the
    dtype of their weights.
    """
    if t.ndim == 0:
        t = t[None]
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(max_period) / half)
    )
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features followed by a two-layer MLP.

    The features are cast to the dtype of the MLP weights, so a model converted to bf16/fp16
    (e.g. by DeepSpeed) never receives fp32 inputs into low-precision linear layers.
    """

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_embedding(t, self.frequency_size).to(self.mlp[0].weight.dtype)
        return self.mlp(feats)  # (B, hidden_size)


def as_timesteps(t: torch.Tensor | float | int | None, batch: int, device: torch.device) -> torch.Tensor:
    """Normalise a timestep argument to a (B,) tensor; ``None`` means t = 0 (clean input)."""
    if t is None:
        return torch.zeros(batch, device=device)
    if not torch.is_tensor(t):
        return torch.full((batch,), float(t), device=device)
    if t.ndim == 0:
        return t.expand(batch)
    return t


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V over ``num_heads`` heads (eq. 47) via scaled_dot_product_attention.

    q: (B, N, C), k and v: (B, M, C) -> (B, N, C).
    """
    b, n, c = q.shape
    m = k.shape[1]
    d = c // num_heads
    q = q.view(b, n, num_heads, d).transpose(1, 2)  # (B, h, N, d)
    k = k.view(b, m, num_heads, d).transpose(1, 2)  # (B, h, M, d)
    v = v.view(b, m, num_heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)  # eq. 47
    return out.transpose(1, 2).reshape(b, n, c)


class ResBlock(nn.Module):
    """Pre-activation residual block ``GN-SiLU-conv -> GN (scale/shift by emb) -SiLU-dropout-conv`` + skip.

    When ``emb_dim`` is given, the (timestep [+ class]) embedding is projected to a per-channel
    scale and shift applied right after the second GroupNorm: ``GN(h) * (1 + scale) + shift``.
    (A plain additive bias *before* the norm would be normalised away when a group holds a single
    channel, as happens at tiny widths.) The last convolution is zero-initialised, so the block
    starts as its skip connection.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        emb_dim: int | None = None,
        dropout: float = 0.0,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels)) if emb_dim else None
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if zero_init:
            zero_module(self.conv2)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        if self.emb_proj is not None and emb is not None:
            scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
            h = torch.addcmul(shift, h, 1 + scale)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SpatialAttention(nn.Module):
    """Self-attention over the H*W positions of a feature map, optionally followed by cross-attention.

    Cross-attention (eq. 47-48): Q is projected from the image features, K and V from the context
    sequence ``tau(y)`` of shape (B, M, context_dim). Both output projections are zero-initialised,
    so the block is the identity at initialisation.
    """

    def __init__(self, channels: int, num_heads: int = 4, context_dim: int | None = None) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_module(nn.Linear(channels, channels))
        self.context_dim = context_dim
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(channels)
            self.to_q = nn.Linear(channels, channels, bias=False)  # W_Q, eq. 48
            self.to_kv = nn.Linear(context_dim, 2 * channels, bias=False)  # W_K, W_V, eq. 48
            self.proj_cross = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        out = x.flatten(2).transpose(1, 2) + self.proj(multihead_attention(q, k, v, self.num_heads))
        if self.context_dim is not None and context is not None:
            q = self.to_q(self.norm_cross(out))  # eq. 48: Q = W_Q phi(z)
            k, v = self.to_kv(context).chunk(2, dim=-1)  # eq. 48: K = W_K tau(y), V = W_V tau(y)
            out = out + self.proj_cross(multihead_attention(q, k, v, self.num_heads))  # eq. 47
        return out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Strided 3x3 convolution halving H and W."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
