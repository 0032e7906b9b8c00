"""The `controlnet` stage: ControlNet (eq. 50) over a registered base diffusion U-Net, on Canny edges.

Trains the ControlNet (:mod:`pipeline.train.controlnet_task`) with the base frozen, then samples both
the ControlNet and the base model from the same noise and labels for held-out images and scores how
well the samples' own Canny edges overlap the control edges (tolerant F1, :mod:`pipeline.eval.edges`).
Logs both scores and a grid (control | ControlNet sample | base sample | held-out image).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline import tracking
from pipeline.config import SpecError
from pipeline.data import load_split, read_manifest
from pipeline.eval.edges import canny_edges, edge_overlap
from pipeline.train.controlnet_task import check_base, edge_control, sample_controlled

log = logging.getLogger("pipeline")


def edge_scores(samples: torch.Tensor, control: torch.Tensor, edges: dict, tolerance: int = 1) -> dict[str, float]:
    """Mean tolerant precision / recall / F1 and exact IoU of the samples' Canny edges against ``control``."""
    pred = canny_edges(samples, **edges)
    scores = edge_overlap(pred, control[:, 0] > 0.5, tolerance)
    return {k: float(v.mean()) for k, v in scores.items()}


def run_controlnet(ctx, name: str, key: str, run_id: str, inputs: dict[str, tracking.ModelRef]
                   ) -> tuple[Path, dict[str, float]]:
    """Train the ControlNet; compare its edge overlap on held-out edge maps with the base model's."""
    from pipeline.eval import image_grid
    from pipeline.stages import _fit, _log_png, pixel_dataset
    from pipeline.train.export import load_exported

    stage = ctx.spec.stages[name]
    (base_name, base_ref), = inputs.items()
    base_dir = tracking.download(base_ref)
    base, base_meta = load_exported(base_dir)
    try:
        check_base(base_meta, f"stage '{base_name}' ({base_ref.uri})")
    except ValueError as exc:
        raise SpecError(f"stages.{name}.needs: {exc}") from None
    h, w, c = read_manifest(ctx.data_dir).image_size
    if list(base_meta["extra"]["sample_shape"]) != [c, h, w]:
        raise SpecError(f"stages.{name}.needs: the base model makes {base_meta['extra']['sample_shape']} images "
                        f"but the data is {[c, h, w]}")
    # Workers fetch the base themselves (they may sit on other nodes), from the registry's artifact store.
    export = _fit(ctx, name, key, run_id, pixel_dataset(ctx, ctx.data_dir),
                  {"inputs": {"base": {"uri": base_ref.source}}})
    model, meta = load_exported(export)
    n = min(stage.sampling.num_samples, ctx.spec.eval.num_samples)
    test = load_split(ctx.data_dir, "test", limit=ctx.spec.eval.held_out_samples)
    images = torch.from_numpy(test["image"])[:n]
    labels = torch.from_numpy(test["label"])[:n]
    n_cls = int(base_meta["extra"].get("num_classes", 0))
    if n_cls and not stage.class_labels:  # both models on the null label: only the edges say which digit
        labels = torch.full_like(labels, n_cls)
    edges = stage.edges.model_dump()
    control = edge_control(images, edges)
    s = stage.sampling
    kw = {"steps": s.steps, "guidance": s.guidance, "eta": s.eta, "seed": ctx.spec.seed}
    controlled = sample_controlled(model, meta, labels, control, **kw)
    plain = sample_controlled(base, base_meta, labels, None, **kw)
    cn, bs = edge_scores(controlled, control, edges), edge_scores(plain, control, edges)
    metrics = {f"eval/edge_{k}": v for k, v in cn.items()}
    metrics.update({f"eval/base_edge_{k}": v for k, v in bs.items()})
    metrics["eval/edge_f1_gain"] = cn["f1"] - bs["f1"]
    metrics["eval/edge_pixels_per_image"] = float(control.sum() / len(control))
    k = min(16, len(images))
    shown = (control[:k] * 2 - 1).expand(-1, c, -1, -1)  # edges white on black, in every channel
    grid = torch.stack([shown, controlled[:k], plain[:k], images[:k]], dim=1)  # control | ControlNet | base | real
    _log_png(run_id, image_grid(grid.flatten(0, 1), nrow=8, scale=4), "samples/controlnet_grid.png")
    log.info("[%s] edge F1 on %d held-out edge maps: ControlNet %.3f vs base %.3f", name, len(images),
             cn["f1"], bs["f1"])
    return export, metrics
