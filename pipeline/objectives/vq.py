"""VQ-VAE objective (notes 1.3.2, eq. 11-13): the pure arithmetic of vector quantisation and the `vq` objective.

Everything here is a small function of tensors, so it can be checked by hand: the nearest-code lookup
(eq. 11), the straight-through estimator, the loss (eq. 12), the EMA codebook statistics with Laplace
smoothing (eq. 13), dead-code restarts, perplexity and code usage. The quantiser module that holds the
codebook as buffers lives in :mod:`pipeline.models.vqvae`.

Models trained with ``objective.type: vq`` (``vq_vae``, ``vq_vae2``) return from ``forward(x)``:
``(x_hat, z_e_list, z_q_list, codes_list)``, one entry per latent level (bottom-up: VQ-VAE-2 lists top, bottom).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.objectives import register_objective
from pipeline.objectives.kl_vae import recon_grid, recon_metrics

# ----------------------------------------------------------------------------- quantisation


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """k = argmin_i ||z - e_i||_2 for every row of z (eq. 11). z: (N, D), codebook: (K, D) -> (N,) long."""
    z, codebook = z.float(), codebook.float()
    # ||z - e||² = ||z||² - 2 z·e + ||e||²; ||z||² is the same for every code and is left out
    dist = codebook.pow(2).sum(1)[None, :] - 2.0 * z @ codebook.t()  # eq. 11
    return dist.argmin(dim=1)


def straight_through(z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """z_q in the forward pass, the identity in the backward pass: ∇_{z_e} L = ∇_{z_q} L (notes 1.3.2)."""
    return z_e + (z_q - z_e).detach()


def vq_loss(x: torch.Tensor, x_hat: torch.Tensor, z_e: list[torch.Tensor], z_q: list[torch.Tensor],
            beta: float, codebook_loss: bool = False) -> dict[str, torch.Tensor]:
    """eq. 12, each term a mean over elements, summed over the latent levels.

    loss = ||x - D(e_k)||² + ||sg[E(x)] - e_k||² + β ||E(x) - sg[e_k]||². With an EMA codebook
    (``codebook_loss=False``) the middle term is left out: the codebook follows eq. 13 instead.
    Returns ``{"loss", "recon", "commit"}`` (scalars; ``commit`` unweighted).
    """
    recon = F.mse_loss(x_hat.float(), x.float())  # eq. 12, reconstruction
    commit = sum(F.mse_loss(e.float(), q.detach().float()) for e, q in zip(z_e, z_q, strict=True))  # eq. 12
    loss = recon + beta * commit
    if codebook_loss:
        loss = loss + sum(F.mse_loss(q.float(), e.detach().float()) for e, q in zip(z_e, z_q, strict=True))
    return {"loss": loss, "recon": recon, "commit": commit}


# ----------------------------------------------------------------------------- EMA codebook (eq. 13)


def code_stats(z: torch.Tensor, codes: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n_i = #{j: k_j = i} and Σ_j z_{i,j}, the per-code counts (K,) and sums (K, D) of one batch (eq. 13)."""
    onehot = F.one_hot(codes, num_codes).to(z.dtype)  # (N, K)
    return onehot.sum(0), onehot.t() @ z


def ema_update(cluster_size: torch.Tensor, embed_sum: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor,
               decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """N ← γN + (1-γ)n and m ← γm + (1-γ)Σz (eq. 13); returns the new (N, m)."""
    return (decay * cluster_size + (1 - decay) * counts,  # eq. 13
            decay * embed_sum + (1 - decay) * sums)  # eq. 13


def laplace_smoothed(cluster_size: torch.Tensor, eps: float) -> torch.Tensor:
    """Ñ_i = (N_i + ε) / (Σ N + K ε) · Σ N: no code's count is zero, the total is unchanged."""
    total = cluster_size.sum()
    return (cluster_size + eps) / (total + cluster_size.numel() * eps) * total


def normalised_codebook(cluster_size: torch.Tensor, embed_sum: torch.Tensor, eps: float) -> torch.Tensor:
    """e_i = m_i / Ñ_i (eq. 13, with Laplace-smoothed counts)."""
    return embed_sum / laplace_smoothed(cluster_size, eps)[:, None]  # eq. 13


def restart_codes(codebook: torch.Tensor, cluster_size: torch.Tensor, embed_sum: torch.Tensor,
                  dead: torch.Tensor, candidates: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Re-initialise the `dead` codes (K,) bool at `candidates` (K, D) (encoder outputs of the current batch).

    A restarted code gets e_i = m_i = candidate and N_i = 1, so eq. 13 moves it quickly towards the
    encoder outputs it attracts. Returns the new (codebook, cluster_size, embed_sum).
    """
    d = dead[:, None]
    return (torch.where(d, candidates, codebook), torch.where(dead, torch.ones_like(cluster_size), cluster_size),
            torch.where(d, candidates, embed_sum))


def random_rows(z: torch.Tensor, k: int) -> torch.Tensor:
    """`k` rows of z (N, D) drawn uniformly (without replacement where N ≥ k), from torch's global RNG."""
    if len(z) >= k:
        idx = torch.randperm(len(z), device=z.device)[:k]
    else:
        idx = torch.randint(0, len(z), (k,), device=z.device)
    return z[idx]


# ----------------------------------------------------------------------------- codebook statistics


def perplexity(counts: torch.Tensor) -> float:
    """exp(-Σ p_i log p_i) with p_i = n_i / Σ n: the effective number of codes in use (1 ... K)."""
    p = counts.double() / counts.sum().clamp_min(1)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()
    return float(torch.exp(entropy))


def code_usage(counts: torch.Tensor) -> float:
    """The fraction of the codebook used at least once."""
    return float((counts > 0).double().mean())


# ----------------------------------------------------------------------------- the objective


@register_objective("vq")
class VQObjective:
    """eq. 12 with commitment weight `beta` (default 0.25) for `vq_vae` / `vq_vae2` models.

    The codebook is updated by EMA (eq. 13) inside the quantiser's forward in training mode;
    ``objective.perplexity_floor`` (optional) adds ``eval/vq_check`` (see :meth:`evaluate`).
    """

    def loss(self, model, batch, gen, cfg: dict[str, Any]):
        x = batch["image"]
        x_hat, z_e, z_q, _ = model(x)
        module = getattr(model, "module", model)  # the DeepSpeed engine wraps the model
        out = vq_loss(x, x_hat, z_e, z_q, beta=float(cfg.get("beta", 0.25)),
                      codebook_loss=not getattr(module, "ema", True))
        return out["loss"], {"recon": out["recon"], "commit": out["commit"]}

    def evaluate(self, model, data_dir: Path, cfg: dict[str, Any], seed: int):
        """Held-out recon MSE/PSNR vs the mean image, per-level code usage and perplexity, reconstructions.

        ``eval/perplexity`` and ``eval/code_usage`` are the smallest over the levels (per level:
        ``eval/perplexity_<level>``). With ``perplexity_floor`` in the objective, ``eval/vq_check`` =
        max(recon_mse / mean_image_mse, perplexity_floor / perplexity) is below 1 exactly when the
        reconstruction beats the mean image and the perplexity is above the floor (gate it with max 1).
        """
        from pipeline.data import HELD_OUT_LIMIT, load_split

        x = torch.from_numpy(load_split(data_dir, "test", limit=HELD_OUT_LIMIT)["image"])
        with torch.no_grad():
            codes = model.encode_codes(x)
            recon = model.decode_codes(codes)
        metrics = recon_metrics(x, recon)
        metrics["eval/recon_vs_baseline"] = metrics["eval/recon_mse"] / max(metrics["eval/mean_image_mse"], 1e-12)
        perps, usages = [], []
        for name, k, c in zip(model.level_names, model.codes_per_level, codes, strict=True):
            counts = torch.bincount(c.flatten(), minlength=k)
            perps.append(perplexity(counts))
            usages.append(code_usage(counts))
            if len(codes) > 1:
                metrics[f"eval/perplexity_{name}"] = perps[-1]
                metrics[f"eval/code_usage_{name}"] = usages[-1]
        metrics["eval/perplexity"] = min(perps)
        metrics["eval/code_usage"] = min(usages)
        floor = cfg.get("perplexity_floor")
        if floor is not None:
            metrics["eval/vq_check"] = max(metrics["eval/recon_vs_baseline"], float(floor) / min(perps))
        return metrics, {"samples/reconstructions.png": recon_grid(x, recon)}
