"""Baselines the end-to-end generator tests compare a job's logged metrics with, computed independently of the
stage code: the FID of a generator collapsed onto the mean held-out image, under the job's registered classifier."""

from __future__ import annotations

from pathlib import Path

import torch

#: Class accuracy of a generator that ignores its label (10 classes).
CHANCE = 0.1


def mean_image_fid(data_dir: Path, classifier_uri: str, num: int = 200) -> float:
    """FID (features of the registered classifier at `classifier_uri`) of `num` copies of the mean held-out
    image against the held-out split of `data_dir`: what a generator that has collapsed to the average scores."""
    from pipeline import tracking
    from pipeline.data import load_split
    from pipeline.eval import sample_metrics
    from pipeline.train.export import load_exported

    classifier, _ = load_exported(tracking.download(tracking.resolve(classifier_uri)))
    real = torch.from_numpy(load_split(data_dir, "test")["image"])  # (N, C, H, W) in [-1, 1]
    fake = real.mean(0, keepdim=True).expand(num, *real.shape[1:]).contiguous()
    return sample_metrics(fake, torch.zeros(num, dtype=torch.long), real, classifier)["fid"]
