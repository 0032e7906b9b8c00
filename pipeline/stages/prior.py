"""The `prior` stage: a PixelCNN over a registered VQ autoencoder's codes; samples = prior codes → VQ decoder.

Evaluation on held-out images: bits per code of their codes under the prior (and, for reference, under
the code frequencies of the training split, a prior that ignores context and class), a class-conditional
sample grid, and with an evaluation classifier in the job the class accuracy / FID / KID of samples.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from pipeline import tracking
from pipeline.config import SpecError

log = logging.getLogger("pipeline")


@torch.no_grad()
def encode_all(vq: nn.Module, images: torch.Tensor, batch_size: int = 500) -> list[torch.Tensor]:
    """The VQ autoencoder's code maps of `images`, one (N, h, w) tensor per level."""
    parts = [vq.encode_codes(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return [torch.cat(level) for level in zip(*parts, strict=True)]


@torch.no_grad()
def prior_bits(prior: nn.Module, codes: list[torch.Tensor], labels: torch.Tensor, batch_size: int = 500
               ) -> list[float]:
    """Mean negative log2-likelihood per code of each level under the prior (teacher-forced)."""
    from pipeline.train.prior_task import code_nll

    sums = [0.0] * len(codes)
    for i in range(0, len(labels), batch_size):
        chunk = [c[i:i + batch_size] for c in codes]
        _, per_level = code_nll(prior(chunk, labels[i:i + batch_size]), chunk)
        for lv, v in enumerate(per_level):
            sums[lv] += float(v) * len(chunk[0])
    return [s / len(labels) / math.log(2) for s in sums]


def unigram_bits(train_codes: torch.Tensor, test_codes: torch.Tensor, num_codes: int) -> float:
    """Bits per held-out code under the training split's code frequencies (add-one smoothed)."""
    counts = torch.bincount(train_codes.flatten(), minlength=num_codes).double() + 1.0
    logp = torch.log2(counts / counts.sum())
    return float(-logp[test_codes.flatten()].mean())


@torch.no_grad()
def sample_images(prior: nn.Module, vq: nn.Module, labels: torch.Tensor, shapes: list[list[int]],
                  temperature: float, seed: int, batch_size: int = 250) -> torch.Tensor:
    """Class-conditional images: codes drawn from the prior, decoded by the VQ decoder."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(labels), batch_size):
        codes = prior.sample(labels[i:i + batch_size], shapes, temperature=temperature, generator=g)
        out.append(vq.decode_codes(codes).float())
    return torch.cat(out)


def run_prior(ctx, name: str, key: str, run_id: str, inputs) -> tuple[Path, dict]:
    """Train the prior on the codes of its input VQ autoencoder; report held-out bits/code and sample quality."""
    from pipeline.data import TRAIN_SAMPLE_LIMIT, load_split, read_manifest
    from pipeline.eval import image_grid, sample_metrics
    from pipeline.stages import _classifier, _fit, _log_png, pixel_dataset
    from pipeline.train.export import load_exported

    stage = ctx.spec.stages[name]
    (ae_stage, ref), = inputs.items()
    vq, _ = load_exported(tracking.download(ref))
    if not hasattr(vq, "encode_codes"):
        raise SpecError(f"stage '{name}' needs a VQ autoencoder (vq_vae, vq_vae2), but {ref.uri} has no codes")
    manifest = read_manifest(ctx.data_dir)
    test = load_split(ctx.data_dir, "test", limit=ctx.spec.eval.held_out_samples)
    train = load_split(ctx.data_dir, "train", limit=TRAIN_SAMPLE_LIMIT)  # the unigram baseline's counts
    test_codes = encode_all(vq, torch.from_numpy(test["image"]))
    shapes = [list(c.shape[-2:]) for c in test_codes]
    data_info = {"autoencoder": ref.uri, "code_shapes": shapes}
    export = _fit(ctx, name, key, run_id, pixel_dataset(ctx, ctx.data_dir),
                  {"inputs": {"autoencoder": {"uri": ref.source}}, "num_classes": manifest.num_classes,
                   "data_info": data_info})
    prior, _ = load_exported(export)

    labels = torch.from_numpy(test["label"]).long()
    bits = prior_bits(prior, test_codes, labels)
    train_codes = encode_all(vq, torch.from_numpy(train["image"]))
    sizes = [c[0].numel() for c in test_codes]
    metrics: dict[str, float] = {
        "eval/bits_per_code": sum(b * s for b, s in zip(bits, sizes, strict=True)) / sum(sizes),
        "eval/bits_per_code_unigram": sum(unigram_bits(tr, te, k) * s for tr, te, k, s in zip(
            train_codes, test_codes, vq.codes_per_level, sizes, strict=True)) / sum(sizes),
        "eval/bits_per_image": sum(b * s for b, s in zip(bits, sizes, strict=True)),
    }
    if len(bits) > 1:
        metrics.update({f"eval/bits_per_code_{n}": b for n, b in zip(vq.level_names, bits, strict=True)})

    temp, n_cls = stage.sampling.temperature, manifest.num_classes
    grid = sample_images(prior, vq, torch.arange(n_cls).repeat_interleave(8), shapes, temp, ctx.spec.seed + 1)
    _log_png(run_id, image_grid(grid, nrow=8, scale=4), "samples/grid.png")
    classifier = _classifier(ctx)
    if classifier is not None:
        n = min(stage.sampling.num_samples, ctx.spec.eval.num_samples)
        sample_labels = torch.arange(n) % n_cls
        t0 = time.perf_counter()
        fake = sample_images(prior, vq, sample_labels, shapes, temp, ctx.spec.seed)
        metrics["eval/samples_per_sec"] = n / (time.perf_counter() - t0)
        real = torch.from_numpy(test["image"])
        metrics.update({f"eval/{k}": v for k, v in sample_metrics(fake, sample_labels, real, classifier).items()})
    log.info("[%s] held-out %.3f bits/code (unigram %.3f)", name, metrics["eval/bits_per_code"],
             metrics["eval/bits_per_code_unigram"])
    return export, metrics
