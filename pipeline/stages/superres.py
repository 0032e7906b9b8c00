"""The `superres` stage: one stage of a cascaded diffusion pipeline (notes section 2.6.1).

Trains the stage (base or super-resolution, :mod:`pipeline.train.superres_task`), then evaluates it on
held-out crops: the held-out diffusion loss; for super-resolution, PSNR/SSIM (torchmetrics) at the stage's
resolution of samples conditioned on the downsampled held-out image against the bicubic upsampling of the
same low-res image, with a grid (low-res | bicubic | SR | ground truth); and a grid of the whole cascade
sampled from noise (each stage's output side by side, the final resolution last).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import tracking
from pipeline.config import SpecError
from pipeline.data import TRAIN_SAMPLE_LIMIT, load_split, read_manifest
from pipeline.diffusion import diffusion_loss
from pipeline.diffusion.cond_aug import downsample, to_residual, upsample_bicubic
from pipeline.train.superres_task import denoiser, sample_stage, sr_condition
from pipeline.train.tasks import make_schedule

log = logging.getLogger("pipeline")

MAX_CASCADE = 8


def image_metrics(pred: Tensor, target: Tensor) -> dict[str, float]:
    """Mean per-image PSNR (dB) and SSIM of images in [-1, 1] (torchmetrics, data range 1 after mapping to [0, 1])."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    p, t = (pred.clamp(-1, 1) + 1) / 2, (target.clamp(-1, 1) + 1) / 2
    psnr = peak_signal_noise_ratio(p, t, data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean")
    ks = 7 if min(p.shape[-2:]) < 16 else 11  # the Gaussian window must fit the image
    ssim = structural_similarity_index_measure(p, t, data_range=1.0, kernel_size=ks)
    return {"psnr": float(psnr), "ssim": float(ssim)}


def nearest(x: Tensor, size: int) -> Tensor:
    """Nearest-neighbour upsampling to ``size`` (shows the pixels as they are in the grids)."""
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="nearest")


@torch.no_grad()
def heldout_loss(model: nn.Module, meta: dict[str, Any], images: Tensor, seed: int, timesteps: int = 10,
                 captions: list[str] | None = None) -> float:
    """Diffusion loss on held-out images at ``timesteps`` evenly spaced t (fixed noise; SR at level 0;
    a text-conditioned stage given the images' ``captions``)."""
    extra = meta["extra"]
    d = extra["diffusion"]
    sched = make_schedule(d)
    size = int(extra["size"])
    x0 = downsample(images, size)
    g = torch.Generator().manual_seed(seed)
    if extra.get("low_res"):
        aug = extra["augment"]
        cond, y = sr_condition(downsample(images, int(extra["low_res"])), size, aug["kind"], aug["levels"], 0.0, g)
        if extra.get("residual_scale"):
            x0 = to_residual(x0, cond, float(extra["residual_scale"]))
    elif extra.get("conditioning") == "text":
        cond, y = None, None
    else:
        cond, y = None, torch.full((len(x0),), int(extra["num_classes"]))
    text = {"captions": captions} if extra.get("conditioning") == "text" else {}
    total = 0.0
    for t_val in torch.linspace(0, sched.num_timesteps - 1, timesteps).round().long().tolist():
        t = torch.full((len(x0),), t_val, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=g)
        out = diffusion_loss(denoiser(model, cond, y, **text), sched, x0, t, noise,
                             parameterization=d.get("parameterization", "eps"), loss_type="simple")
        total += float(out["mse"].mean())
    return total / timesteps


def load_cascade(model_dir: str | Path) -> list[tuple[nn.Module, dict[str, Any]]]:
    """The registered cascade ending at ``model_dir``, base first (each stage names its input's model URI)."""
    from pipeline.train.export import load_exported

    chain = []
    d: str | Path = model_dir
    for _ in range(MAX_CASCADE):
        model, meta = load_exported(d)
        chain.append((model, meta))
        uri = meta["extra"].get("cascade_input")
        if not uri:
            return chain[::-1]
        d = tracking.download(tracking.resolve(uri))
    raise RuntimeError(f"cascade ending at {model_dir} is longer than {MAX_CASCADE} stages (a loop?)")


@torch.no_grad()
def sample_cascade(chain: list[tuple[nn.Module, dict[str, Any]]], labels: Tensor, seed: int,
                   levels: list[float] | None = None, captions: list[str] | None = None) -> list[Tensor]:
    """Sample the whole cascade from noise: the base given ``labels`` (text-conditioned stages: ``captions``),
    then every SR stage on the previous output.

    Each stage uses its own sampling settings (steps, eta, guidance, dynamic threshold) and its `sample_level`
    (or ``levels[i]`` for SR stage i). Returns every stage's output, lowest resolution first.
    """
    outs: list[Tensor] = []
    for i, (model, meta) in enumerate(chain):
        extra = meta["extra"]
        s = extra.get("sampling", {})
        kw = {"n": len(labels), "steps": int(s.get("steps", 50)), "eta": float(s.get("eta", 0.0)),
              "guidance": float(s.get("guidance", 0.0)), "threshold": s.get("dynamic_threshold"),
              "captions": captions if extra.get("conditioning") == "text" else None}
        if i == 0:
            outs.append(sample_stage(model, meta, seed=seed, labels=labels, **kw))
            continue
        level = levels[i - 1] if levels is not None else float(extra["augment"].get("sample_level", 0.0))
        low = downsample(outs[-1], int(extra["low_res"])) if outs[-1].shape[-1] != extra["low_res"] else outs[-1]
        outs.append(sample_stage(model, meta, seed=seed + i, low=low, level=level, **kw))
    return outs


def _check_stage(ctx, name: str, stage, data_size: int) -> None:
    if data_size % stage.size:
        raise SpecError(f"stages.{name}.size: {stage.size} does not divide the data resolution "
                        f"data.image_size={data_size} (training images are area-downsampled to it)")
    if stage.low_res is None:
        if stage.needs:
            raise SpecError(f"stages.{name}.needs: a cascade base (low_res: null) needs no other stage")
        return
    prev = ctx.spec.stages[stage.needs[0]]
    if prev.kind != "superres" or prev.size != stage.low_res:
        raise SpecError(f"stages.{name}.needs: '{stage.needs[0]}' must be a superres stage with size "
                        f"{stage.low_res} (this stage's low_res), got kind={prev.kind}, "
                        f"size={getattr(prev, 'size', None)}")


def run_superres(ctx, name: str, key: str, run_id: str, inputs: dict[str, tracking.ModelRef]
                 ) -> tuple[Path, dict[str, float]]:
    """Train one cascade stage; evaluate it on held-out crops and sample the cascade up to it."""
    from pipeline.eval import classify, image_grid
    from pipeline.eval.text import class_captions
    from pipeline.stages import _classifier, _fit, _log_png, pixel_dataset
    from pipeline.train.export import load_exported

    stage = ctx.spec.stages[name]
    manifest = read_manifest(ctx.data_dir)
    h, w, c = manifest.image_size
    if h != w:
        raise SpecError(f"stage '{name}': cascades need square images, the data is {w}x{h}")
    _check_stage(ctx, name, stage, h)
    cascade_input = next(iter(inputs.values())).uri if stage.low_res else None
    extra: dict[str, Any] = {"num_classes": manifest.num_classes,
                             "data_info": {"channels": c, "cascade_input": cascade_input}}
    if stage.conditioning == "text":
        from pipeline.train.text_task import resolve_text_encoder

        train_captions = load_split(ctx.data_dir, "train", on_corrupt=ctx.spec.data.on_corrupt,
                                    limit=TRAIN_SAMPLE_LIMIT)["caption"]
        extra["text_encoder"] = resolve_text_encoder(stage.text_encoder.model_dump(), train_captions)
    export = _fit(ctx, name, key, run_id, pixel_dataset(ctx, ctx.data_dir), extra)
    model, meta = load_exported(export)
    seed = ctx.spec.seed
    s = stage.sampling
    n = min(s.num_samples, ctx.spec.eval.num_samples)
    test = load_split(ctx.data_dir, "test", on_corrupt=ctx.spec.data.on_corrupt, limit=ctx.spec.eval.held_out_samples)
    images = torch.from_numpy(test["image"])[:n]
    captions = [str(t) for t in test["caption"][:n]]
    metrics = {"eval/heldout_mse": heldout_loss(model, meta, images, seed, captions=captions)}
    if stage.low_res:
        hi = downsample(images, stage.size)
        low = downsample(images, stage.low_res)
        bicubic = upsample_bicubic(low, stage.size)
        sr = sample_stage(model, meta, n=len(images), steps=s.steps, eta=s.eta, seed=seed, low=low,
                          level=stage.augment.sample_level, guidance=s.guidance, threshold=s.dynamic_threshold,
                          captions=captions if stage.conditioning == "text" else None)
        m_sr, m_bic = image_metrics(sr, hi), image_metrics(bicubic, hi)
        metrics.update({f"eval/{k}": v for k, v in m_sr.items()})
        metrics.update({f"eval/bicubic_{k}": v for k, v in m_bic.items()})
        metrics.update({f"eval/{k}_gain": m_sr[k] - m_bic[k] for k in m_sr})
        k = min(8, len(images))
        cols = [nearest(low[:k], stage.size), bicubic[:k], sr[:k], hi[:k]]  # low-res | bicubic | SR | truth
        grid = torch.stack(cols, dim=1).flatten(0, 1)
        _log_png(run_id, image_grid(grid, nrow=4, scale=4), "samples/superres_grid.png")
        log.info("[%s] held-out %d crops: SR PSNR %.2f dB SSIM %.4f | bicubic PSNR %.2f dB SSIM %.4f", name,
                 len(images), m_sr["psnr"], m_sr["ssim"], m_bic["psnr"], m_bic["ssim"])
    chain = load_cascade(export)
    n_cls = int(chain[0][1]["extra"]["num_classes"])
    templates = class_captions(test["caption"], test["label"], n_cls)
    labels = torch.arange(16) % n_cls
    outs = sample_cascade(chain, labels, seed + 1, captions=[templates[int(y)] for y in labels])
    grid = torch.stack([nearest(o, stage.size) for o in outs], dim=1).flatten(0, 1)
    _log_png(run_id, image_grid(grid, nrow=2 * len(outs), scale=4), "samples/cascade_grid.png")
    classifier = _classifier(ctx)
    if classifier is not None and stage.size == h:  # the classifier reads images at the data resolution
        labels = torch.as_tensor(test["label"][:n], dtype=torch.long)
        final = sample_cascade(chain, labels, seed + 2, captions=captions)[-1]
        metrics["eval/cascade_class_accuracy"] = float((classify(classifier, final) == labels).float().mean())
        log.info("[%s] class accuracy of %d cascade samples (%s): %.3f", name, n,
                 "from held-out captions" if stage.conditioning == "text" else "class-conditional",
                 metrics["eval/cascade_class_accuracy"])
    return export, metrics
