"""Augmentations that run inside Ray Data tasks (numpy in, numpy out)."""

from __future__ import annotations

from typing import Any

import numpy as np


def augment_batch(batch: dict[str, Any], *, hflip: bool = False, shift: int = 0,
                  seed: int | None = None) -> dict[str, Any]:
    """Random horizontal flips and translations of up to `shift` pixels (zero padded).

    `batch["image"]` is (B, C, H, W) float32; other columns pass through unchanged.
    """
    images = np.asarray(batch["image"], dtype=np.float32)
    if not hflip and shift <= 0:
        return batch
    rng = np.random.default_rng(seed)
    out = images.copy()
    if hflip:
        flip = rng.random(len(out)) < 0.5
        out[flip] = out[flip][..., ::-1]
    if shift > 0:
        b, c, h, w = out.shape
        padded = np.full((b, c, h + 2 * shift, w + 2 * shift), -1.0, dtype=np.float32)  # -1 = black
        padded[:, :, shift:shift + h, shift:shift + w] = out
        dy, dx = rng.integers(0, 2 * shift + 1, size=(2, b))
        for i in range(b):
            out[i] = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return {**batch, "image": out}
