"""Canny edge maps (ControlNet's control signal, notes section 2.7.2) and a tolerant edge-overlap score.

Edges come from :func:`skimage.feature.canny` on the image's grey level scaled to [0, 1]. The overlap of
two edge maps counts an edge pixel as matched when the other map has an edge pixel within ``tolerance``
pixels (Chebyshev distance, i.e. in the (2·tol+1)² neighbourhood): precision over the first map,
recall over the second, and their harmonic mean F1; the IoU is exact (no tolerance).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def to_gray01(images: Tensor) -> Tensor:
    """(N, C, H, W) images in [-1, 1] → (N, H, W) grey level in [0, 1] (channel mean)."""
    return ((images.float().clamp(-1, 1) + 1) / 2).mean(dim=1)


def canny_edges(images: Tensor, sigma: float = 1.0, low_threshold: float = 0.1,
                high_threshold: float = 0.2) -> Tensor:
    """Boolean (N, H, W) Canny edge maps of images in [-1, 1] (``skimage.feature.canny`` per image)."""
    from skimage.feature import canny

    gray = to_gray01(images).cpu().numpy().astype(np.float64)
    maps = [canny(g, sigma=sigma, low_threshold=low_threshold, high_threshold=high_threshold) for g in gray]
    return torch.from_numpy(np.stack(maps)) if maps else torch.zeros(images.shape[0], *images.shape[-2:],
                                                                       dtype=torch.bool)


def dilate(edges: Tensor, tolerance: int) -> Tensor:
    """Boolean dilation of (N, H, W) maps by a (2·tol+1)² square (pixels within Chebyshev distance tol)."""
    if tolerance <= 0:
        return edges.bool()
    k = 2 * tolerance + 1
    return F.max_pool2d(edges.float()[:, None], k, stride=1, padding=tolerance)[:, 0] > 0


def edge_overlap(pred: Tensor, target: Tensor, tolerance: int = 1) -> dict[str, Tensor]:
    """Per-image tolerant precision, recall, F1 and exact IoU of boolean (N, H, W) edge maps ``pred`` vs ``target``.

    Two empty maps agree perfectly (1); an empty map against a non-empty one scores 0.
    """
    pred, target = pred.bool(), target.bool()
    dims = (-2, -1)
    n_pred, n_target = pred.sum(dims).float(), target.sum(dims).float()
    pred_hit = (pred & dilate(target, tolerance)).sum(dims).float()  # predicted edges near a true edge
    target_hit = (target & dilate(pred, tolerance)).sum(dims).float()  # true edges near a predicted edge
    both_empty = (n_pred == 0) & (n_target == 0)
    precision = torch.where(n_pred > 0, pred_hit / n_pred.clamp(min=1), both_empty.float())
    recall = torch.where(n_target > 0, target_hit / n_target.clamp(min=1), both_empty.float())
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(precision))
    inter, union = (pred & target).sum(dims).float(), (pred | target).sum(dims).float()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))  # exact pixels, no tolerance
    return {"precision": precision, "recall": recall, "f1": f1, "iou": iou}
