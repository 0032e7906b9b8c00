"""Sampling text-conditioned generators from captions, and their evaluation in a job.

:func:`generate_from_captions` reuses :func:`pipeline.eval.generate` (samplers, classifier-free
guidance, decoding) by turning N captions into a table of N contexts plus the empty caption's: label
i selects caption i, label N is the ∅ condition of classifier-free guidance (eq. 40).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.eval import Generator, generate


class CaptionTable(nn.Module):
    """``forward(x, t, y)`` = the denoiser cross-attending to caption ``y``'s context; ``y = N`` is ∅ ("")."""

    def __init__(self, model: nn.Module, captions: Sequence[str]):
        super().__init__()
        if not hasattr(model, "encode_text"):
            raise ValueError("this generator is not text-conditioned (no text encoder); sample it with labels")
        self.model = model
        with torch.no_grad():
            context, _ = model.encode_text([*captions, ""])
        self.register_buffer("table", context, persistent=False)  # (N + 1, L, D)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x, t, context=self.table[y])


@torch.no_grad()
def generate_from_captions(gen: Generator, captions: Sequence[str], **kwargs: Any) -> torch.Tensor:
    """Samples (N, C, H, W) in pixel space, one per caption; keyword arguments as :func:`generate`
    (steps, guidance, sampler, eta, seed, batch_size)."""
    table = CaptionTable(gen.model, captions)
    meta = {**gen.meta, "extra": {**gen.extra, "num_classes": len(captions)}}  # index N = the ∅ caption
    return generate(Generator(table, meta, gen.decoder), torch.arange(len(captions)), **kwargs)


def class_captions(captions: Sequence[str], labels: Sequence[int], num_classes: int) -> list[str]:
    """For each class, the first caption of that class (the class's caption template), "" if none."""
    first: dict[int, str] = {}
    for c, y in zip(captions, labels, strict=True):
        first.setdefault(int(y), str(c))
    return [first.get(k, "") for k in range(num_classes)]


def evaluate_text_generator(ctx, run_id: str, model_dir: Path, data_dir: Path, *, steps, guidance: float,
                            num_samples: int, sampler: str = "ddim", eta: float = 0.0) -> dict[str, float]:
    """Sample from the held-out captions of `data_dir`; FID/KID on the pipeline classifier's features and
    class accuracy (the class named by each caption); a grid (one row per class caption) and its
    captions are logged to the stage's run."""
    from mlflow.tracking import MlflowClient

    from pipeline.data import load_split
    from pipeline.eval import image_grid, sample_metrics
    from pipeline.stages import _classifier, _log_png, load_generator

    gen = load_generator(model_dir)
    test = load_split(data_dir, "test", on_corrupt=ctx.spec.data.on_corrupt, limit=ctx.spec.eval.held_out_samples)
    idx = [i % len(test["caption"]) for i in range(num_samples)]
    captions = [test["caption"][i] for i in idx]
    labels = torch.as_tensor(test["label"][idx], dtype=torch.long)
    kw = {"steps": steps, "guidance": guidance, "sampler": sampler, "eta": eta}
    t0 = time.perf_counter()
    fake = generate_from_captions(gen, captions, seed=ctx.spec.seed, **kw)
    secs = time.perf_counter() - t0
    rows = class_captions(test["caption"], test["label"], gen.num_classes)
    grid = generate_from_captions(gen, [c for c in rows for _ in range(8)], seed=ctx.spec.seed + 1, **kw)
    _log_png(run_id, image_grid(grid, nrow=8, scale=4), "samples/grid.png")
    MlflowClient().log_text(run_id, "\n".join(f"row {k}: {c}" for k, c in enumerate(rows)),
                            "samples/grid_captions.txt")
    metrics = {"samples_per_sec": num_samples / secs}
    classifier = _classifier(ctx)
    if classifier is not None:
        real = torch.from_numpy(load_split(ctx.data_dir, "test", limit=ctx.spec.eval.held_out_samples)["image"])
        metrics.update(sample_metrics(fake, labels, real, classifier))
    return {f"eval/{k}": v for k, v in metrics.items()}
