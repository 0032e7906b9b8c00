"""The TD-VAE objective (eq. 14) for a `td_vae` model on filmstrip sequences (e.g. `data.source: moving-digits`).

Per sequence, one pair t1 < t2 is drawn: δ = t2 − t1 uniform in 1..max_jump, then t1 uniform in
0..T−1−δ. With z_t2 ~ p_B(·|b_t2) and z_t1 ~ q_S(·|z_t2, b_t1, b_t2), the loss is −J_{t1,t2} of eq. 14:

    −J = −log p_D(x_t2|z_t2)                                     (recon)
         + E_{q_S}[log q_S(z_t1|z_t2, b_t1, b_t2) − log p_B(z_t1|b_t1)]   (kl_smooth: closed-form KL)
         + log p_B(z_t2|b_t2) − log p_T(z_t2|z_t1)                 (kl_jump: one-sample estimate)

The smoothing term is taken in closed form, KL(q_S || p_B(·|b_t1)): its expectation over z_t1 is exactly
that term of eq. 14, with less variance. `objective` keys: `type: td_vae`; `kl_warmup` (steps, default 0):
the two KL terms are weighted by min(1, step / kl_warmup) — a training aid against the model settling on
the mean frame before its latents carry anything; from then on the loss is exactly −J. Evaluation: `horizons`
(default [1, 2, 3, 4, 5]), `context` (frames observed before predicting; default T − max(horizons)),
`eval_samples` (draws averaged into the predictive mean, default 16).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.objectives import register_objective

_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(logvar)) of a diagonal Gaussian, summed over the last dim."""
    return -0.5 * (_LOG_2PI + logvar + (z - mean).pow(2) * (-logvar).exp()).sum(-1)


def gaussian_kl(mean_q: torch.Tensor, logvar_q: torch.Tensor, mean_p: torch.Tensor,
                logvar_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_q, exp(logvar_q)) || N(mean_p, exp(logvar_p))) of diagonal Gaussians, summed over the last dim."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mean_q - mean_p).pow(2)) * (-logvar_p).exp()
                  - 1.0).sum(-1)


def sample_jumps(batch: int, frames: int, max_jump: int, gen: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Time pairs (t1, t2) (B,) with 0 <= t1 < t2 <= frames − 1 and t2 − t1 <= max_jump.

    δ = t2 − t1 is uniform in 1..min(max_jump, frames − 1), then t1 uniform in 0..frames − 1 − δ.
    """
    if frames < 2:
        raise ValueError(f"jumps need at least 2 frames, got {frames}")
    top = min(max_jump, frames - 1)
    delta = torch.randint(1, top + 1, (batch,), generator=gen)
    t1 = (torch.rand(batch, generator=gen) * (frames - delta)).long().clamp(max=frames - 1 - delta)
    return t1.to(device), (t1 + delta).to(device)


def jump_loss(out: dict[str, torch.Tensor], kl_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """−J_{t1,t2} of eq. 14 per sequence (B,) and its three parts, from the model's forward dict.

    ``kl_weight`` < 1 scales both KL terms (KL warm-up); 1 is eq. 14.
    """
    target = ((out["x2"] + 1.0) * 0.5).clamp(0.0, 1.0)
    recon = F.binary_cross_entropy_with_logits(out["x2_logits"], target, reduction="none").flatten(1).sum(1)
    # eq. 14: E_{q_S}[log p_S(z1|z2,b1,b2) − log p_B(z1|b1)] = KL(q_S || p_B(·|b1))
    kl_smooth = gaussian_kl(out["qs_mean"], out["qs_logvar"], out["pb1_mean"], out["pb1_logvar"])
    # eq. 14: log p_B(z2|b2) − log p_T(z2|z1), at the sampled z1, z2
    kl_jump = (gaussian_log_prob(out["z2"], out["pb2_mean"], out["pb2_logvar"])
               - gaussian_log_prob(out["z2"], out["pt_mean"], out["pt_logvar"]))
    return {"loss": recon + kl_weight * (kl_smooth + kl_jump), "recon": recon, "kl_smooth": kl_smooth,
            "kl_jump": kl_jump}


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)  # a DeepSpeed engine wraps the nn.Module


@register_objective("td_vae")
class TDVAEObjective:
    """Jump objective of eq. 14; held-out k-step-ahead prediction error against repeating the last frame."""

    keys = {"type", "kl_warmup", "horizons", "context", "eval_samples"}

    def check_cfg(self, cfg: dict[str, Any]) -> None:
        """Reject unknown keys and bad values when the job file is read."""
        unknown = sorted(set(cfg) - self.keys)
        if unknown:
            raise ValueError(f"objective 'td_vae': unknown key(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(self.keys))}")
        horizons = cfg.get("horizons", [1])
        if not isinstance(horizons, list) or not horizons or min(int(k) for k in horizons) < 1:
            raise ValueError(f"objective 'td_vae': horizons must be a list of steps >= 1, got {horizons!r}")
        if int(cfg.get("eval_samples", 16)) < 1 or int(cfg.get("context", 1)) < 1:
            raise ValueError("objective 'td_vae': eval_samples and context must be >= 1")
        if int(cfg.get("kl_warmup", 0)) < 0:
            raise ValueError(f"objective 'td_vae': kl_warmup must be >= 0 steps, got {cfg['kl_warmup']}")

    def loss(self, model, batch, gen, cfg: dict[str, Any]):
        x = batch["image"]
        m = _unwrap(model)
        t1, t2 = sample_jumps(len(x), m.frames, m.max_jump, gen, x.device)
        eps2 = torch.randn((len(x), m.z_dim), generator=gen, device=x.device)
        eps1 = torch.randn((len(x), m.z_dim), generator=gen, device=x.device)
        warmup = int(cfg.get("kl_warmup", 0))
        weight = min(1.0, int(m.num_updates) / warmup) if warmup > 0 else 1.0
        if m.training:
            m.num_updates += 1
        parts = jump_loss(model(x, t1, t2, eps2, eps1), kl_weight=weight)
        metrics = {k: parts[k].mean().detach() for k in ("recon", "kl_smooth", "kl_jump")}
        return parts["loss"].mean(), {**metrics, "kl_weight": torch.tensor(weight, device=x.device)}

    def evaluate(self, model, data_dir: Path, cfg: dict[str, Any], seed: int):
        from pipeline.data import HELD_OUT_LIMIT, load_split

        x = torch.from_numpy(load_split(data_dir, "test", limit=HELD_OUT_LIMIT)["image"])
        return evaluate_sequences(model, model.split(x), cfg, seed)


def _horizons(cfg: dict[str, Any], frames: int) -> tuple[list[int], int]:
    horizons = sorted({int(k) for k in cfg.get("horizons", [1, 2, 3, 4, 5])})
    if not horizons or horizons[0] < 1:
        raise ValueError(f"objective.horizons must be positive integers, got {cfg.get('horizons')}")
    context = int(cfg.get("context", frames - horizons[-1]))
    if context < 1 or context + horizons[-1] > frames:
        raise ValueError(f"objective.context={context} with horizons up to {horizons[-1]} needs "
                         f"1 <= context and context + {horizons[-1]} <= {frames} frames")
    return horizons, context


def evaluate_sequences(model, frames: torch.Tensor, cfg: dict[str, Any], seed: int
                       ) -> tuple[dict[str, float], dict[str, bytes]]:
    """k-step-ahead prediction MSE of held-out ``frames`` (N, T, C, H, W) in [-1, 1], and PNG grids.

    The model observes ``context`` frames and predicts frame context−1+k for each horizon k (the predictive
    mean over ``eval_samples`` draws). Baselines: repeating the last observed frame, and the mean of the
    held-out frames at that time (what a model that ignores its input can at best predict). Also the filtering
    reconstruction MSE (each frame decoded from the mean of p_B(z_t|b_t)) as `eval/recon_mse`.
    """
    from pipeline.eval import image_grid

    n, t = frames.shape[:2]
    horizons, context = _horizons(cfg, t)
    samples = int(cfg.get("eval_samples", 16))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pred = model.predict(frames[:, :context], horizons, gen, samples=samples)
        recon = model.filter_reconstruct(frames)
    last = frames[:, context - 1]
    metrics: dict[str, float] = {"eval/recon_mse": float(((recon - frames) ** 2).mean()),
                                 "eval/context_frames": float(context)}
    for k in horizons:
        target = frames[:, context - 1 + k]
        metrics[f"eval/pred_mse_k{k}"] = float(((pred[k].mean(0) - target) ** 2).mean())
        metrics[f"eval/repeat_last_mse_k{k}"] = float(((last - target) ** 2).mean())
        metrics[f"eval/mean_frame_mse_k{k}"] = float(((target.mean(0, keepdim=True) - target) ** 2).mean())
    metrics["eval/pred_mse"] = sum(metrics[f"eval/pred_mse_k{k}"] for k in horizons) / len(horizons)
    metrics["eval/repeat_last_mse"] = sum(metrics[f"eval/repeat_last_mse_k{k}"] for k in horizons) / len(horizons)
    metrics["eval/mean_frame_mse"] = sum(metrics[f"eval/mean_frame_mse_k{k}"] for k in horizons) / len(horizons)

    show = min(8, n)
    blank = -torch.ones_like(frames[:show, 0])
    rows = []
    for i in range(show):
        sampled, mean = list(frames[i, :context]), list(frames[i, :context])
        for j in range(context, t):
            k = j - context + 1
            sampled.append(pred[k][0, i] if k in pred else blank[i])
            mean.append(pred[k].mean(0)[i] if k in pred else blank[i])
        rows += [*frames[i], *sampled, *mean]
    rollouts = image_grid(torch.stack(rows), nrow=t, scale=4)
    filt = image_grid(torch.stack([frames[:show], recon[:show]], 1).flatten(0, 2), nrow=t, scale=4)
    return metrics, {"samples/rollouts.png": rollouts, "samples/filter_reconstructions.png": filt}
