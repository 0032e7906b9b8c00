"""The KL-VAE objective of the latent-diffusion first stage (the default `objective.type`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.objectives import register_objective
from pipeline.objectives.autoencoder import vae_loss


def recon_metrics(x: torch.Tensor, recon: torch.Tensor) -> dict[str, float]:
    """Held-out reconstruction MSE, PSNR (data in [-1, 1]) and the mean-image predictor's MSE (baseline)."""
    mse = float(((recon - x) ** 2).mean())
    baseline = float(((x - x.mean(0, keepdim=True)) ** 2).mean())
    psnr = float(10 * np.log10(4.0 / max(mse, 1e-12)))  # peak-to-peak 2 → MAX² = 4
    return {"eval/recon_mse": mse, "eval/mean_image_mse": baseline, "eval/psnr": psnr}


def recon_grid(x: torch.Tensor, recon: torch.Tensor, n: int = 16) -> bytes:
    """PNG: originals and reconstructions interleaved, 8 per row."""
    from pipeline.eval import image_grid

    grid = torch.stack([x[:n], recon[:n]], 1).flatten(0, 1)
    return image_grid(grid.clamp(-1, 1), nrow=8, scale=4)


@register_objective("kl_vae")
class KLVAEObjective:
    """Negative ELBO with a small KL weight β (eq. 6–7, β-VAE form eq. 10) for a `kl_vae` model."""

    def loss(self, model, batch, gen, cfg: dict[str, Any]):
        x = batch["image"]
        x_hat, mean, logvar = model(x)
        out = vae_loss(x_hat, x, mean, logvar, beta=float(cfg.get("beta", 1e-4)))
        return out["loss"], {"recon": out["recon"].mean(), "kl": out["kl"].mean()}

    def evaluate(self, model, data_dir: Path, cfg: dict[str, Any], seed: int):
        from pipeline.data import HELD_OUT_LIMIT, load_split

        x = torch.from_numpy(load_split(data_dir, "test", limit=HELD_OUT_LIMIT)["image"])
        with torch.no_grad():
            mean, _ = model.encode(x)
            recon = model.decode(mean)
        return recon_metrics(x, recon), {"samples/reconstructions.png": recon_grid(x, recon)}
