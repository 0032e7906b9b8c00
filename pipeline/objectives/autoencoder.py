"""Autoencoder math as small pure functions: the VAE's negative ELBO (eq. 6-7) with a beta-weighted KL
term (beta-VAE, eq. 10), and the classic family's terms (eq. 1-4: corruption, sparsity, k-sparse, contraction)."""

from __future__ import annotations

import math
from collections.abc import Callable
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


# ----------------------------------------------------------------------------- classic autoencoder family
# Pure functions used by the objectives in `pipeline.objectives.classic`.


def reconstruction_sse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample squared error ||x - x'||^2 summed over pixels -> (B,); its batch mean is L_AE (eq. 1)."""
    return (x_hat - x).pow(2).flatten(1).sum(dim=1)  # eq. 1 (eq. 2 with x' = f(g(x~)))


def corrupt(
    x: torch.Tensor, kind: Literal["mask", "gaussian"], level: float, gen: torch.Generator | None = None,
    fill: float = -1.0,
) -> torch.Tensor:
    """The DAE's corrupted input x~ (eq. 2).

    * ``mask``: every pixel independently set to ``fill`` (the "zero" intensity, -1 for data in [-1, 1])
      with probability ``level`` (masking noise, like dropout on the input);
    * ``gaussian``: x + level * eps, eps ~ N(0, I) (additive isotropic Gaussian noise of std ``level``).
    """
    if kind == "mask":
        if not 0.0 <= level < 1.0:
            raise ValueError(f"masking level must be in [0, 1), got {level}")
        drop = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) < level
        return torch.where(drop, torch.full_like(x, fill), x)
    if kind == "gaussian":
        if level < 0:
            raise ValueError(f"Gaussian corruption std must be >= 0, got {level}")
        return x + level * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    raise ValueError(f"unknown corruption {kind!r}; expected 'mask' or 'gaussian'")


def kl_sparsity(rho: float, rho_hat: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Sum over hidden units j of KL(Bernoulli(rho) || Bernoulli(rho_hat_j)) (the penalty of eq. 3).

    KL(rho || rho_hat) = rho log(rho / rho_hat) + (1 - rho) log((1 - rho) / (1 - rho_hat)).
    ``rho_hat`` (s_l,) holds each unit's mean activation over the batch; it is clamped into
    [eps, 1 - eps] so that the penalty stays finite.
    """
    if not 0.0 < rho < 1.0:
        raise ValueError(f"sparsity target rho must be in (0, 1), got {rho}")
    r = rho_hat.clamp(eps, 1.0 - eps)
    return (rho * torch.log(rho / r) + (1.0 - rho) * torch.log((1.0 - rho) / (1.0 - r))).sum()  # eq. 3


def topk_mask(z: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest activations of every row of ``z`` (B, n) (k-sparse AE, step 2)."""
    n = z.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] (the code size), got {k}")
    idx = z.topk(k, dim=-1).indices
    return torch.zeros_like(z, dtype=torch.bool).scatter_(-1, idx, True)


def ksparse(z: torch.Tensor, k: int) -> torch.Tensor:
    """z' = Sparsify(z): the top-k activations per row kept, the rest set to 0.

    A multiplication by the (constant) mask, so the gradient flows only through the kept units.
    """
    return z * topk_mask(z.detach(), k).to(z.dtype)


def annealed_k(k: int, n: int, step: int, anneal_steps: int) -> int:
    """The k of a k-sparse AE at a training step: linearly from all ``n`` units down to ``k`` over
    ``anneal_steps`` steps, then ``k`` (starting dense keeps units from dying early)."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return k
    return max(k, round(n - (n - k) * step / anneal_steps))


def contractive_penalty_sigmoid(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """||J(x)||_F^2 per sample -> (B,), in closed form for a sigmoid layer h = sigmoid(W x + b) (eq. 4).

    dh_j/dx_i = h_j (1 - h_j) W_ji, so ||J||_F^2 = sum_j (h_j (1 - h_j))^2 sum_i W_ji^2.
    ``h``: (B, n) activations; ``weight``: (n, d) (an nn.Linear weight).
    """
    return (h * (1.0 - h)).pow(2) @ weight.pow(2).sum(dim=1)  # eq. 4


def contractive_penalty(encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ||J(x)||_F^2 = sum_ij (dh_j/dx_i)^2 of any per-sample encoder -> (penalty (B,), h (B, n)) (eq. 4).

    One vectorised vector-Jacobian product per code unit (``is_grads_batched``: n backward passes
    batched by vmap, n = the small code size, never a loop over input pixels), with ``create_graph``
    so that the penalty can be trained. The encoder must treat samples independently (no batch norm).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        h = encoder(x)
        h2 = h.flatten(1)
        n = h2.shape[1]
        basis = torch.eye(n, device=h.device, dtype=h.dtype).unsqueeze(1).expand(n, *h2.shape)
        (rows,) = torch.autograd.grad(h2, x, grad_outputs=basis, create_graph=True, is_grads_batched=True)
    return rows.pow(2).flatten(2).sum(dim=2).sum(dim=0), h  # eq. 4: rows (n, B, ...) = J^T per sample


def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I) drawn outside the graph (reparameterisation trick, notes 1.2.4)."""
    return mean + torch.exp(0.5 * logvar) * eps


def log_normal_diag(z: torch.Tensor, mean: torch.Tensor | float, logvar: torch.Tensor | float) -> torch.Tensor:
    """log N(z; mean, diag(exp(logvar))) summed over all non-batch dims -> (B,)."""
    logvar_t = torch.as_tensor(logvar, dtype=z.dtype, device=z.device)
    lp = -0.5 * (math.log(2 * math.pi) + logvar_t + (z - mean).pow(2) * torch.exp(-logvar_t))
    return lp.flatten(1).sum(dim=1)


def gaussian_decoder_scale(sigma: float) -> float:
    """The `recon_scale` of :func:`vae_loss` for a Gaussian decoder of std ``sigma``: 1 / (2 sigma^2)."""
    if sigma <= 0:
        raise ValueError(f"decoder sigma must be > 0, got {sigma}")
    return 1.0 / (2.0 * sigma * sigma)


def decoder_nll(x_hat: torch.Tensor, x: torch.Tensor, decoder: Literal["gaussian", "bernoulli"],
                sigma: float = 1.0 / math.sqrt(2.0)) -> torch.Tensor:
    """-log p(x|z) in nats per sample -> (B,), with every constant (so it can be reported as an NLL).

    Gaussian: ||x - x_hat||^2 / (2 sigma^2) + D/2 log(2 pi sigma^2); Bernoulli: the summed BCE of the
    [0, 1] targets (x + 1) / 2 (an exact NLL for binary pixels).
    """
    nll = reconstruction_nll(x_hat, x, decoder)
    if decoder == "bernoulli":
        return nll
    d = x[0].numel()
    return nll * gaussian_decoder_scale(sigma) + 0.5 * d * math.log(2 * math.pi * sigma * sigma)


def bits_per_dim(nats: torch.Tensor | float, num_dims: int) -> float:
    """A per-image negative log-likelihood in nats expressed in bits per dimension."""
    return float(nats) / (num_dims * math.log(2.0))
