"""The classic autoencoder family (notes 1.1-1.3) as `objective.type`s of an autoencoder stage.

=========  ====================================================================  =====================
type       training loss (batch mean)                                            model
=========  ====================================================================  =====================
ae         ||x - f(g(x))||^2 (eq. 1)                                             mlp_ae
dae        ||x - f(g(x~))||^2, x~ masked or Gaussian-corrupted (eq. 2)            mlp_ae
sae        ||x - f(g(x))||^2 + beta sum_j KL(rho || rho_hat_j) (eq. 3)             mlp_ae, sigmoid code
ksparse    ||x - f(Sparsify_k(g(x)))||^2, top-k code units only (notes 1.1.3)     mlp_ae, linear code
cae        ||x - f(g(x))||^2 + lam ||J_g(x)||_F^2 (eq. 4)                          mlp_ae
vae        -ELBO (eq. 6-7) with beta on the KL (beta-VAE, eq. 10)                mlp_vae
=========  ====================================================================  =====================

Every evaluator reports the held-out reconstruction MSE and PSNR next to the mean-image baseline and
their ratio (`eval/recon_ratio`, < 1 beats the baseline), and logs reconstructions; the AEs also their
code's sparsity and first-layer filters, the VAE its ELBO / importance-weighted NLL, prior samples,
latent traversals and (on data with generative factors) the MIG of its posterior means.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.objectives import register_objective
from pipeline.objectives.autoencoder import (
    annealed_k,
    bits_per_dim,
    contractive_penalty,
    contractive_penalty_sigmoid,
    corrupt,
    decoder_nll,
    gaussian_decoder_scale,
    gaussian_kl,
    kl_sparsity,
    ksparse,
    log_normal_diag,
    reconstruction_sse,
    reparameterize,
    vae_loss,
)
from pipeline.objectives.kl_vae import recon_grid, recon_metrics

# ----------------------------------------------------------------------------- helpers


def _module(model: Any) -> nn.Module:
    """The plain module behind a DeepSpeed engine (or the module itself)."""
    return getattr(model, "module", model)


def _check_keys(name: str, cfg: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(cfg) - known - {"type"})
    if unknown:
        raise ValueError(f"objective {name!r}: unknown key(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(known | {'type'}))}")


def _need(model: nn.Module, name: str, what: str, ok: bool) -> None:
    if not ok:
        raise ValueError(f"objective {name!r} needs {what} (got model {type(model).__name__})")


def _test_split(data_dir: Path) -> dict[str, Any]:
    from pipeline.data import HELD_OUT_LIMIT, load_split

    return load_split(data_dir, "test", limit=HELD_OUT_LIMIT)


def _recon_eval(x: torch.Tensor, recon: torch.Tensor) -> dict[str, float]:
    m = recon_metrics(x, recon)
    m["eval/recon_ratio"] = m["eval/recon_mse"] / max(m["eval/mean_image_mse"], 1e-12)
    return m


def code_stats(h: torch.Tensor, threshold: float) -> dict[str, float]:
    """Activation sparsity of codes ``h`` (N, n): mean activation, fraction of near-zero activations
    (|h| < threshold) and fraction of dead units (near zero on every sample)."""
    near_zero = h.abs() < threshold
    return {"eval/mean_activation": float(h.mean()), "eval/mean_abs_activation": float(h.abs().mean()),
            "eval/frac_near_zero": float(near_zero.float().mean()),
            "eval/dead_units": float(near_zero.all(dim=0).float().mean())}


def filters_png(filters: torch.Tensor, max_filters: int = 100) -> bytes:
    """PNG of filters (n, C, H, W) as image tiles, each scaled by its own max |w| into [-1, 1]."""
    from pipeline.eval import image_grid

    f = filters[:max_filters].detach().float()
    f = f / f.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return image_grid(f, nrow=int(math.ceil(math.sqrt(len(f)))), scale=3)


def _ae_eval(model: nn.Module, x: torch.Tensor, code_fn, threshold: float, filters: bool
             ) -> tuple[dict[str, float], dict[str, bytes], torch.Tensor]:
    """Reconstruction metrics and code statistics of a deterministic AE (code_fn: x -> code)."""
    with torch.no_grad():
        h = code_fn(x)
        recon = model.decode(h)
    metrics = {**_recon_eval(x, recon), **code_stats(h, threshold)}
    images = {"samples/reconstructions.png": recon_grid(x, recon)}
    if filters and hasattr(model, "filters"):
        images["samples/filters.png"] = filters_png(model.filters)
    return metrics, images, h


# ----------------------------------------------------------------------------- deterministic AEs


@register_objective("ae")
class AEObjective:
    """Plain autoencoder: squared reconstruction error (eq. 1)."""

    name = "ae"
    keys = {"zero_threshold"}

    def check_cfg(self, cfg: dict[str, Any]) -> None:
        """Reject unknown keys and bad values before anything runs."""
        _check_keys(self.name, cfg, self.keys)

    def loss(self, model, batch, gen, cfg: dict[str, Any]):
        x = batch["image"]
        recon, _ = _module(model)(x)
        sse = reconstruction_sse(recon, x)  # eq. 1
        return sse.mean(), {"recon_mse": sse.mean() / x[0].numel()}

    def evaluate(self, model, data_dir: Path, cfg: dict[str, Any], seed: int):
        x = torch.from_numpy(_test_split(data_dir)["image"])
        metrics, images, _ = _ae_eval(model, x, model.encode, float(cfg.get("zero_threshold", 0.05)), True)
        return metrics, images


@register_objective("dae")
class DAEObjective(AEObjective):
    """Denoising AE: reconstruct x from a corrupted x~ (eq. 2); `corruption: mask|gaussian`, `level`
    (masking probability, or the noise std in [-1, 1] units)."""

    name = "dae"
    keys = {"corruption", "level", "zero_threshold"}

    def check_cfg(self, cfg: dict[str, Any]) -> None:
        super().check_cfg(cfg)
        corrupt(torch.zeros(1), *self._corruption(cfg))  # ValueError for a bad kind or level

    @staticmethod
    def _corruption(cfg: dict[str, Any]) -> tuple[str, float]:
        kind = str(cfg.get("corruption", "mask"))
        return kind, float(cfg.get("level", 0.3 if kind == "mask" else 0.5))

    def loss(self, model, batch, gen, cfg: dict[str, Any]):
        x = batch["image"]
        x_tilde = corrupt(x, *self._corruption(cfg), gen=gen)  # x~ of eq. 2
        recon, _ = _module(model)(x_tilde)
        sse = reconstruction_sse(recon, x)  # eq. 2
        return sse.mean(), {"recon_mse": sse.mean() / x[0].numel()}

    def evaluate(self, model, data_dir: Path, cfg: dict[str, Any], seed: int):
        from pipeline.eval import image_grid

        metrics, images = super().evaluate(model, data_dir, cfg, seed)
        x = torch.from_numpy(_test_split(data_dir)["image"])
        gen = torch.Generator().manual_seed(seed)
        x_tilde = corrupt(x, *self._corruption(cfg), gen=gen)
        with torch.no_grad():
            denoised = model(x_tilde)[0]
        metrics["eval/corrupted_mse"] = float(((x_tilde - x) ** 2).mean())
        metrics["eval/denoised_mse"] = float(((denoised - x) ** 2).mean())
        n = 8
        rows = torch.cat([x_tilde[:n], denoised[:n], x[:n]])  # corrupted / denoised / clean
        images["samples/denoising.png"] = image_grid(rows.clamp(-1, 1), nrow=n, scale=4)
        return metrics, images


@register_objective("sae")
class SAEObjective(AEObjective):
    """Sparse AE: eq. 1 plus `beta` * sum_j KL(rho || rho_hat_j) (eq. 3) on sigmoid code activations,
    rho_hat_j the batch mean of unit j."""

    name = "sae"
    keys = {"rho", "beta", "zero_threshold"}

    def check_cfg(self, cfg: dict[str, Any]) -> None:
        super().check_cfg(cfg)
        kl_sparsity(float(cfg.get("rho", 0.05)), torch.full((1,), 0.5))  # ValueError for rho outside (0, 1)
        if float(cfg.get("beta", 3.0)) < 0:
            raise ValueError(f"objective 'sae': beta must be >= 0, got {cfg['beta']}")

    def loss(self, model, batch, gen, cfg: dict[str, Any]):
        m = _module(model)
        _need(m, self.name, "an mlp_ae with code_activation: sigmoid (activations in (0, 1))",
              getattr(m, "code_activation", None) == "sigmoid")
        x = batch["image"]
        recon, h = m(x)
        sse = reconstruction_sse(recon, x)
        rho_hat = h.mean(dim=0)  # average activation of every hidden unit over the batch
        penalty = kl_sparsity(float(cfg.get("rho", 0.05)), rho_hat)
        loss = sse.mean() + float(cfg.get("beta", 3.0)) * penalty  # eq. 3
        return loss, {"recon_mse": sse.mean() / x[0].numel(), "kl_sparsity": penalty,
                      "mean_activation": rho_hat.mean()}


@register_objective("ksparse")
class KSparseObjective(AEObjective):
    """k-sparse AE: only the `k` largest code activations of each sample reach the decoder (and get gradient).

    With `anneal_steps`, k starts at the code size and falls linearly to `k` over that many steps (the
    model's `num_updates` buffer counts them), which keeps fewer units dead.
    """

    name = "ksparse"
    keys = {"k", "anneal_steps", "zero_threshold"}

    def check_cfg(self, cfg: dict[str, Any]) -> None:
        super().check_cfg(cfg)
        if "k" not in cfg or int(cfg["k"]) < 1:
            raise ValueError("objective 'ksparse' needs `k` >= 1 (the number of code units kept)")

    def loss(self, model, batch, gen, cfg: dict[str, Any]):
        m = _module(model)
        x = batch["image"]
        h = m.encode(x)
        step = int(m.num_updates) if hasattr(m, "num_updates") else 0
        k = annealed_k(int(cfg["k"]), h.shape[1], step, int(cfg.get("anneal_steps", 0)))
        if m.training and hasattr(m, "num_updates"):
            m.num_updates += 1
        z = ksparse(h, k)  # steps 1-2: z' = Sparsify(g(x))
        sse = reconstruction_sse(m.decode(z), x)  # step 3
        return sse.mean(), {"recon_mse": sse.mean() / x[0].numel(), "k": torch.tensor(float(k))}

    def evaluate(self, model, data_dir: Path, cfg: dict[str, Any], seed: int):
        x = torch.from_numpy(_test_split(data_dir)["image"])
        k = int(cfg["k"])
        metrics, images, _ = _ae_eval(model, x, lambda v: ksparse(model.encode(v), k),
                                      float(cfg.get("zero_threshold", 1e-6)), True)
        return metrics, images


@register_objective("cae")
class CAEObjective(AEObjective):
    """Contractive AE: eq. 1 plus `lam` * ||J_g(x)||_F^2 (eq. 4). `jacobian: auto` uses the closed form
    for a single sigmoid layer and exact batched autograd over the code units otherwise."""

    name = "cae"
    keys = {"lam", "jacobian", "zero_threshold"}

    def check_cfg(self, cfg: dict[str, Any]) -> None:
        super().check_cfg(cfg)
        if cfg.get("jacobian", "auto") not in ("auto", "closed_form", "autograd"):
            raise ValueError(f"objective 'cae': jacobian must be auto, closed_form or autograd, got "
                             f"{cfg['jacobian']!r}")
        if float(cfg.get("lam", 0.1)) < 0:
            raise ValueError(f"objective 'cae': lam must be >= 0, got {cfg['lam']}")

    @staticmethod
    def penalty(m: nn.Module, x: torch.Tensor, how: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """(||J||_F^2 per sample (B,), code h) by the closed form or by autograd."""
        # (under ZeRO-3 a partitioned weight reads as empty outside forward: then autograd, which needs no W)
        closed = getattr(m, "single_sigmoid_layer", False) and m.encoder[0].weight.numel() > 0
        if how == "closed_form" and not closed:
            raise ValueError("objective 'cae': jacobian: closed_form needs an mlp_ae with hidden: [] and "
                             "code_activation: sigmoid; use jacobian: autograd (or auto)")
        if closed and how != "autograd":
            h = m.encode(x)
            return contractive_penalty_sigmoid(h, m.encoder[0].weight), h  # eq. 4, closed form
        return contractive_penalty(m.encode, x)  # eq. 4, exact autograd

    def loss(self, model, batch, gen, cfg: dict[str, Any]):
        m = _module(model)
        x = batch["image"]
        jac, h = self.penalty(m, x, str(cfg.get("jacobian", "auto")))
        sse = reconstruction_sse(m.decode(h), x)
        loss = sse.mean() + float(cfg.get("lam", 0.1)) * jac.mean()  # eq. 4 added to eq. 1
        return loss, {"recon_mse": sse.mean() / x[0].numel(), "jacobian_fro2": jac.mean()}

    def evaluate(self, model, data_dir: Path, cfg: dict[str, Any], seed: int):
        metrics, images = super().evaluate(model, data_dir, cfg, seed)
        x = torch.from_numpy(_test_split(data_dir)["image"])
        jac, _ = self.penalty(model, x, str(cfg.get("jacobian", "auto")))
        metrics["eval/jacobian_fro2"] = float(jac.detach().mean())
        return metrics, images


# ----------------------------------------------------------------------------- VAE


def _mig(codes: np.ndarray, factors: np.ndarray) -> float | None:
    """MIG of posterior means against generative factors, if `pipeline.eval.disentangle` exists."""
    try:
        from pipeline.eval import disentangle
    except ImportError:
        return None
    fn = getattr(disentangle, "mig", None)
    return None if fn is None else float(fn(codes, factors))


@register_objective("vae")
class VAEObjective:
    """VAE: reparameterised negative ELBO (eq. 6-7); `beta` > 1 gives the beta-VAE (eq. 10).

    cfg: `decoder: gaussian|bernoulli`, `beta` (1), `sigma` (Gaussian decoder std in [-1, 1] pixel units,
    0.1 by default), `eval_samples` (posterior samples per image for the ELBO, 8), `iw_samples`
    (importance samples for the NLL bound, 64).
    """

    keys = {"decoder", "beta", "sigma", "eval_samples", "iw_samples"}

    def check_cfg(self, cfg: dict[str, Any]) -> None:
        """Reject unknown keys and bad values before anything runs."""
        _check_keys("vae", cfg, self.keys)
        if cfg.get("decoder", "gaussian") not in ("gaussian", "bernoulli"):
            raise ValueError(f"objective 'vae': decoder must be gaussian or bernoulli, got {cfg['decoder']!r}")
        gaussian_decoder_scale(float(cfg.get("sigma", 0.1)))
        if float(cfg.get("beta", 1.0)) < 0:
            raise ValueError(f"objective 'vae': beta must be >= 0, got {cfg['beta']}")

    @staticmethod
    def _opts(cfg: dict[str, Any]) -> tuple[str, float, float]:
        return str(cfg.get("decoder", "gaussian")), float(cfg.get("beta", 1.0)), float(cfg.get("sigma", 0.1))

    @staticmethod
    def pixels(out: torch.Tensor, decoder: str) -> torch.Tensor:
        """The decoder output as an image in [-1, 1]: the Gaussian mean, or 2 * sigmoid(logits) - 1."""
        return out if decoder == "gaussian" else torch.sigmoid(out) * 2 - 1

    def loss(self, model, batch, gen, cfg: dict[str, Any]):
        m = _module(model)
        decoder, beta, sigma = self._opts(cfg)
        x = batch["image"]
        mean, logvar = m.encode(x)
        eps = torch.randn(mean.shape, generator=gen, device=mean.device, dtype=mean.dtype)
        z = reparameterize(mean, logvar, eps)  # z = mu + sigma * eps, eps ~ N(0, I)
        scale = gaussian_decoder_scale(sigma) if decoder == "gaussian" else 1.0
        out = vae_loss(m.decode(z), x, mean, logvar, beta=beta, decoder=decoder, recon_scale=scale)  # eq. 7, 10
        return out["loss"], {"recon": out["recon"] * scale, "kl": out["kl"]}

    @torch.no_grad()
    def bounds(self, model: nn.Module, x: torch.Tensor, cfg: dict[str, Any], gen: torch.Generator
               ) -> dict[str, torch.Tensor]:
        """Per-image negative ELBO (eq. 7, closed-form KL + Monte Carlo reconstruction term) and the
        importance-weighted NLL bound -log mean_k p(x, z_k) / q(z_k|x) (>= -log p(x), <= -ELBO), in nats."""
        decoder, _, sigma = self._opts(cfg)
        s, k = int(cfg.get("eval_samples", 8)), int(cfg.get("iw_samples", 64))
        mean, logvar = model.encode(x)
        kl = gaussian_kl(mean, logvar)
        rec = torch.zeros(len(x))
        for _ in range(s):
            z = reparameterize(mean, logvar, torch.randn(mean.shape, generator=gen))
            rec += decoder_nll(model.decode(z), x, decoder, sigma) / s
        log_w = torch.empty(k, len(x))
        for i in range(k):
            z = reparameterize(mean, logvar, torch.randn(mean.shape, generator=gen))
            log_w[i] = (-decoder_nll(model.decode(z), x, decoder, sigma) + log_normal_diag(z, 0.0, 0.0)
                        - log_normal_diag(z, mean, logvar))
        nll_iw = -(torch.logsumexp(log_w, dim=0) - math.log(k))
        return {"neg_elbo": rec + kl, "recon_nll": rec, "kl": kl, "nll_iw": nll_iw, "kl_per_dim": (
            0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)).mean(0)}

    def evaluate(self, model, data_dir: Path, cfg: dict[str, Any], seed: int):
        from pipeline.eval import image_grid

        decoder, _, _ = self._opts(cfg)
        split = _test_split(data_dir)
        x = torch.from_numpy(split["image"])
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            mean, _ = model.encode(x)
            recon = self.pixels(model.decode(mean), decoder)
        metrics = _recon_eval(x, recon)
        b = self.bounds(model, x, cfg, gen)
        d = x[0].numel()
        metrics.update({"eval/neg_elbo": float(b["neg_elbo"].mean()), "eval/recon_nll": float(b["recon_nll"].mean()),
                        "eval/kl": float(b["kl"].mean()), "eval/nll_iw": float(b["nll_iw"].mean())})
        if decoder == "bernoulli":  # a discrete likelihood: bits per dimension are meaningful
            metrics["eval/neg_elbo_bpd"] = bits_per_dim(metrics["eval/neg_elbo"], d)
            metrics["eval/nll_iw_bpd"] = bits_per_dim(metrics["eval/nll_iw"], d)
        # active units: latent dims whose posterior mean varies over the data (Cov_x E[z|x] > 0.01)
        metrics["eval/active_units"] = float((mean.var(dim=0) > 0.01).sum())
        if "factors" in split and split["factors"] is not None:
            mig = _mig(mean.numpy(), np.asarray(split["factors"]))
            if mig is not None:
                metrics["eval/mig"] = mig

        images = {"samples/reconstructions.png": recon_grid(x, recon)}
        with torch.no_grad():
            z = torch.randn(64, model.latent, generator=gen)
            images["samples/prior_samples.png"] = image_grid(
                self.pixels(model.decode(z), decoder).clamp(-1, 1), nrow=8, scale=3)
            # traversals: the (up to) 8 latent dims with the largest KL, each swept over [-3, 3] from image 0
            dims = b["kl_per_dim"].argsort(descending=True)[:8]
            steps = torch.linspace(-3, 3, 9)
            zt = mean[:1].repeat(len(dims) * len(steps), 1)
            for r, j in enumerate(dims.tolist()):
                zt[r * len(steps):(r + 1) * len(steps), j] = steps
            images["samples/traversals.png"] = image_grid(
                self.pixels(model.decode(zt), decoder).clamp(-1, 1), nrow=len(steps), scale=3)
        return metrics, images
