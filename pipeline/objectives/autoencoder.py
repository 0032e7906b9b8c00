"""VAE objective: negative ELBO (eq. 6-7) with a beta-weighted KL term (beta-VAE, eq. 10)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) in closed form, summed over all non-batch dims -> (B,).

    KL = 1/2 * sum(mean^2 + sigma^2 - 1 - log sigma^2)  (KL term of eq. 7).
    """
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)  # eq. 7, KL term
    return kl.flatten(1).sum(dim=1)


def reconstruction_nll(
    x_hat: torch.Tensor, x: torch.Tensor, decoder: Literal["gaussian", "bernoulli"] = "gaussian"
) -> torch.Tensor:
    """-log p(x|z) per sample (up to an additive constant), summed over pixels -> (B,).

    * ``gaussian``: p(x|z) = N(x; x_hat, sigma^2 I) with fixed sigma^2 = 1/2, so
      -log p(x|z) = ||x - x_hat||^2 + const: the sum of squared errors. Data is expected in [-1, 1].
    * ``bernoulli``: ``x_hat`` are logits, the data in [-1, 1] is mapped to [0, 1] targets via
      (x + 1) / 2 and -log p(x|z) is the summed binary cross-entropy with logits.
    """
    if decoder == "gaussian":
        nll = (x_hat - x).pow(2)
    elif decoder == "bernoulli":
        target = ((x + 1.0) * 0.5).clamp(0.0, 1.0)
        nll = F.binary_cross_entropy_with_logits(x_hat, target, reduction="none")
    else:
        raise ValueError(f"unknown decoder {decoder!r}; expected 'gaussian' or 'bernoulli'")
    return nll.flatten(1).sum(dim=1)


def vae_loss(
    x_hat: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    beta: float = 1.0,
    decoder: Literal["gaussian", "bernoulli"] = "gaussian",
    recon_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Negative ELBO (eq. 6-7) with KL weight ``beta`` (eq. 10), averaged over the batch.

    loss = mean_b[ recon_scale * (-log p(x_b|z_b)) + beta * KL(q(z|x_b) || N(0, I)) ]

    ``beta=1, recon_scale=1`` is the plain VAE; ``beta > 1`` the beta-VAE. For the Gaussian
    decoder, ``recon_scale`` is equivalent to choosing the decoder variance sigma^2 = 1 / (2 * recon_scale).
    Returns ``{"loss", "recon", "kl"}`` as scalars (batch means; ``recon`` is unscaled).
    """
    recon = reconstruction_nll(x_hat, x, decoder)  # (B,), -E_q[log p(x|z)], eq. 7
    kl = gaussian_kl(mean, logvar)  # (B,), eq. 7
    loss = (recon_scale * recon + beta * kl).mean()  # eq. 10
    return {"loss": loss, "recon": recon.mean(), "kl": kl.mean()}
