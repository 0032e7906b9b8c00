"""Noise conditioning augmentation for cascaded diffusion (notes section 2.6.1, Ho et al. 2021).

A super-resolution stage is conditioned on a low-resolution image. At training time that image is
the downsampled ground truth; at sampling time it comes from the previous stage of the cascade. The
mismatch is bridged by corrupting the conditioning during training at a random *level*, telling the
model the level (as a class-like embedding of the discretised level), and choosing a level at
sampling time: Gaussian noise at low resolution, Gaussian blur at higher resolution (section 2.6.1).

All functions are pure: images are (B, C, H, W) tensors in [-1, 1]; randomness comes in as arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

AUG_KINDS = ("noise", "blur")


def downsample(x: Tensor, size: int) -> Tensor:
    """Area (box-filter) downsampling to ``size`` x ``size``: each output pixel is the mean of its block."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if x.shape[-1] % size or x.shape[-2] % size:
        raise ValueError(f"cannot area-downsample {tuple(x.shape[-2:])} to {size}x{size}: not an integer factor")
    return F.avg_pool2d(x, kernel_size=x.shape[-1] // size)


def upsample_bicubic(x: Tensor, size: int) -> Tensor:
    """Bicubic upsampling to ``size`` x ``size`` (half-pixel centres), clamped to the image range [-1, 1]."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(-1.0, 1.0)


def noise_augment(x: Tensor, gamma: Tensor, noise: Tensor) -> Tensor:
    """Gaussian noise augmentation z = √(1−γ²)·x + γ·ε, per sample γ ∈ [0, 1).

    This is the forward process q(x_s | x_0) = √ᾱ_s x_0 + √(1−ᾱ_s) ε (eq. 17) with √(1−ᾱ_s) = γ, so
    the augmented conditioning keeps unit-scale variance and γ = 0 leaves it unchanged.
    """
    g = gamma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return (1.0 - g * g).sqrt() * x + g * noise  # eq. 17


def gaussian_kernel1d(sigma: float, radius: int | None = None) -> Tensor:
    """Normalised 1-D Gaussian weights exp(−k²/2σ²) for k = −r..r (r = ⌈3σ⌉ by default); [1] for σ = 0."""
    if sigma < 0:
        raise ValueError(f"blur sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return torch.ones(1, dtype=torch.float64)
    r = int(math.ceil(3.0 * sigma)) if radius is None else radius
    k = torch.arange(-r, r + 1, dtype=torch.float64)
    w = torch.exp(-(k * k) / (2.0 * sigma * sigma))
    return w / w.sum()


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with standard deviation ``sigma`` pixels, reflecting at the border."""
    w = gaussian_kernel1d(float(sigma)).to(x)
    r = (len(w) - 1) // 2
    if r == 0:
        return x
    c = x.shape[1]
    if r >= min(x.shape[-2:]):  # reflect padding needs r < size; a kernel this wide is a near-mean anyway
        raise ValueError(f"blur sigma {sigma} is too large for a {tuple(x.shape[-2:])} image")
    h = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), w.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(h, (0, 0, r, r), mode="reflect"), w.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def blur_augment(x: Tensor, sigmas: Tensor) -> Tensor:
    """Gaussian blur augmentation with a per-sample σ (one blur per distinct σ in the batch)."""
    out = x.clone()
    for s in torch.unique(sigmas):
        sel = sigmas == s
        out[sel] = gaussian_blur(x[sel], float(s))
    return out


def augment(x: Tensor, kind: str, values: Tensor, noise: Tensor | None = None) -> Tensor:
    """Corrupt low-resolution conditioning ``x`` at per-sample levels ``values`` (γ for noise, σ for blur)."""
    if kind == "noise":
        if noise is None:
            raise ValueError("noise augmentation needs a noise tensor")
        return noise_augment(x, values, noise)
    if kind == "blur":
        return blur_augment(x, values)
    raise ValueError(f"unknown conditioning augmentation {kind!r}; expected one of {', '.join(AUG_KINDS)}")


def level_index(value: float, levels: Sequence[float]) -> int:
    """Index of the discretised level nearest to ``value`` (what the model's level embedding is given)."""
    if not levels:
        raise ValueError("at least one augmentation level is needed")
    return min(range(len(levels)), key=lambda i: (abs(levels[i] - value), i))


def random_levels(n: int, levels: Sequence[float], generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Training-time levels: indices drawn uniformly from the discretised levels, and their values."""
    idx = torch.randint(0, len(levels), (n,), generator=generator, device=device)
    values = torch.tensor(list(levels), dtype=torch.float32, device=device)[idx]
    return idx, values


def to_residual(x: Tensor, cond: Tensor, scale: float) -> Tensor:
    """What a residual SR model generates: the detail over its upsampled conditioning, (x − cond) / scale."""
    return (x - cond) / scale


def from_residual(r: Tensor, cond: Tensor, scale: float) -> Tensor:
    """The image back from a generated residual: cond + scale · r, clamped to [-1, 1]."""
    return (cond + scale * r).clamp(-1.0, 1.0)
