"""Fully connected autoencoders of the classic family (notes 1.1) and a fully connected VAE (notes 1.2).

* ``mlp_ae``: x -> h = g(x) -> x' = f(h); the code activation is picked per objective: ``sigmoid``
  for the sparse (eq. 3) and contractive (eq. 4) AEs, ``linear`` for the k-sparse AE, anything for AE/DAE.
  With ``hidden=[]`` the encoder is one linear layer, whose weight rows are the learned filters.
* ``mlp_vae``: a diagonal-Gaussian posterior q(z|x) = N(mean, exp(logvar)) and a decoder whose output is
  the mean of a Gaussian p(x|z) or the logits of a Bernoulli p(x|z) (the objective decides).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pipeline.models import register

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "linear": nn.Identity}
LOGVAR_MIN, LOGVAR_MAX = -12.0, 8.0


def _activation(name: str, what: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown {what} {name!r}; expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _mlp(sizes: Sequence[int], activation: str) -> list[nn.Module]:
    """Linear layers between consecutive ``sizes`` with ``activation`` after all but the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(_activation(activation, "activation"))
    return layers


class _Base(nn.Module):
    def __init__(self, in_channels: int, image_size: int) -> None:
        super().__init__()
        if in_channels < 1 or image_size < 1:
            raise ValueError(f"in_channels and image_size must be >= 1, got {in_channels}, {image_size}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.input_dim = in_channels * image_size * image_size

    def _image(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.view(-1, self.in_channels, self.image_size, self.image_size)


@register("mlp_ae")
class MLPAutoencoder(_Base):
    """Fully connected autoencoder x (B, C, H, W) -> code h (B, latent) -> reconstruction (B, C, H, W).

    ``hidden`` lists the encoder's hidden widths (the decoder mirrors them); ``code_activation`` is applied
    to the code (``sigmoid`` | ``relu`` | ``linear`` | ``tanh`` | ``silu``). The decoder output is linear.
    ``tied_init`` starts every decoder layer from the transpose of its mirrored encoder layer (the weights
    are not tied afterwards); it keeps more k-sparse units alive. The ``num_updates`` buffer counts training
    steps for objectives with a schedule (k-sparse's k annealing); it is saved and restored with the weights.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 16, hidden: Sequence[int] = (), latent: int = 64,
                 activation: str = "relu", code_activation: str = "sigmoid", tied_init: bool = False) -> None:
        super().__init__(in_channels, image_size)
        self.hidden = tuple(int(h) for h in hidden)
        self.latent = latent
        self.code_activation = code_activation
        sizes = [self.input_dim, *self.hidden, latent]
        self.encoder = nn.Sequential(*_mlp(sizes, activation), _activation(code_activation, "code_activation"))
        self.decoder = nn.Sequential(*_mlp(sizes[::-1], activation))
        if tied_init:
            enc = [m for m in self.encoder if isinstance(m, nn.Linear)]
            dec = [m for m in self.decoder if isinstance(m, nn.Linear)]
            with torch.no_grad():
                for e, d in zip(enc, reversed(dec), strict=True):
                    d.weight.copy_(e.weight.T)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @property
    def filters(self) -> torch.Tensor:
        """The first encoder layer's weight rows as images (n, C, H, W): what each first-layer unit detects."""
        w = self.encoder[0].weight
        return w.view(-1, self.in_channels, self.image_size, self.image_size)

    @property
    def single_sigmoid_layer(self) -> bool:
        """True when h = sigmoid(W x + b): the contractive penalty then has a closed form (eq. 4)."""
        return not self.hidden and self.code_activation == "sigmoid"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> h: (B, latent)."""
        return self.encoder(x.flatten(1))

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """h: (B, latent) -> x': (B, C, H, W)."""
        return self._image(self.decoder(h))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (reconstruction, code)."""
        h = self.encode(x)
        return self.decode(h), h


@register("mlp_vae")
class MLPVAE(_Base):
    """Fully connected VAE: q(z|x) = N(mean, exp(logvar)) with z of size ``latent``; p(x|z) from the decoder.

    The decoder output is the Gaussian mean of the pixels or their Bernoulli logits, as the objective reads it.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 16, hidden: Sequence[int] = (256,),
                 latent: int = 8, activation: str = "relu") -> None:
        super().__init__(in_channels, image_size)
        self.hidden = tuple(int(h) for h in hidden)
        self.latent = latent
        sizes = [self.input_dim, *self.hidden, 2 * latent]
        self.encoder = nn.Sequential(*_mlp(sizes, activation))
        self.decoder = nn.Sequential(*_mlp([latent, *self.hidden[::-1], self.input_dim], activation))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) -> (mean, logvar), each (B, latent); logvar clamped for stability."""
        mean, logvar = self.encoder(x.flatten(1)).chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, latent) -> decoder output (B, C, H, W) (pixel means or Bernoulli logits)."""
        return self._image(self.decoder(z))

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (decoder output, mean, logvar); decodes z = mean + sigma * eps, or the mean if not ``sample``."""
        mean, logvar = self.encode(x)
        if not sample:
            return self.decode(mean), mean, logvar
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.decode(mean + torch.exp(0.5 * logvar) * eps), mean, logvar


__all__ = ["MLPAutoencoder", "MLPVAE"]
