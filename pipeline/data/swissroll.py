"""2-D Swiss-roll toy data (study notes, fig. 2-3) and a sliced Wasserstein distance for comparing samples."""

from __future__ import annotations

import numpy as np

# The raw roll (t cos t, t sin t), t in [1.5π, 4.5π], has a per-axis std of about 6.6-6.9.
SWISS_ROLL_SCALE = 7.0


def swiss_roll(n: int, seed: int = 0, noise: float = 0.0) -> np.ndarray:
    """``n`` points of a 2-D Swiss roll, divided by a fixed scale to have roughly unit variance.

    ``noise`` is the std of isotropic Gaussian noise added after scaling. Returns (n, 2) float32.
    """
    rng = np.random.default_rng(seed)
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.random(n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / SWISS_ROLL_SCALE
    if noise > 0:
        x = x + noise * rng.standard_normal(x.shape)
    return x.astype(np.float32)


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between point clouds ``a`` (n, d) and ``b`` (m, d).

    Projects both on ``n_projections`` random unit directions, compares the sorted 1-D projections
    (at common quantile levels when n != m), and returns sqrt(mean over directions of W2²).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError("a and b must be (n, d) and (m, d) arrays")
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((a.shape[1], n_projections))
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    pa = np.sort(a @ dirs, axis=0)
    pb = np.sort(b @ dirs, axis=0)
    if pa.shape[0] != pb.shape[0]:
        levels = (np.arange(max(len(pa), len(pb))) + 0.5) / max(len(pa), len(pb))
        pa, pb = _quantiles(pa, levels), _quantiles(pb, levels)
    return float(np.sqrt(np.mean((pa - pb) ** 2)))


def _quantiles(sorted_cols: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Linearly interpolated quantiles of each (already sorted) column at ``levels`` in (0, 1)."""
    n = sorted_cols.shape[0]
    pos = np.clip(levels * n - 0.5, 0, n - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    frac = (pos - lo)[:, None]
    return sorted_cols[lo] * (1 - frac) + sorted_cols[hi] * frac
