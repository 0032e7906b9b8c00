"""Canny edge maps and the tolerant edge-overlap score, against hand examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.feature import canny

from pipeline.eval.edges import canny_edges, dilate, edge_overlap


def _map(points: list[tuple[int, int]], size: int = 8) -> torch.Tensor:
    m = torch.zeros(1, size, size, dtype=torch.bool)
    for r, c in points:
        m[0, r, c] = True
    return m


LINE = [(4, c) for c in range(1, 7)]  # a horizontal edge on row 4


def test_identical_maps_score_one():
    s = edge_overlap(_map(LINE), _map(LINE))
    assert {k: float(v) for k, v in s.items()} == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "iou": 1.0}


def test_disjoint_maps_score_zero():
    far = [(0, c) for c in range(1, 7)]  # row 0: 4 rows away from row 4
    s = edge_overlap(_map(LINE), _map(far))
    assert {k: float(v) for k, v in s.items()} == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "iou": 0.0}


def test_one_pixel_shift_is_within_tolerance_two_is_not():
    shifted = [(r + 1, c) for r, c in LINE]
    assert float(edge_overlap(_map(LINE), _map(shifted))["f1"]) == 1.0
    assert float(edge_overlap(_map(LINE), _map(shifted), tolerance=0)["f1"]) == 0.0
    assert float(edge_overlap(_map(LINE), _map(shifted))["iou"]) == 0.0  # the IoU is exact
    diagonal = [(r + 1, c + 1) for r, c in LINE]  # Chebyshev distance 1
    assert float(edge_overlap(_map(LINE), _map(diagonal))["f1"]) == 1.0
    two_away = [(r + 2, c) for r, c in LINE]
    assert float(edge_overlap(_map(LINE), _map(two_away))["f1"]) == 0.0


def test_partial_overlap_by_hand():
    pred = _map(LINE + [(0, 0), (0, 7)])  # 6 matched edge pixels + 2 stray ones
    target = _map(LINE[:3])  # half the line
    s = edge_overlap(pred, target)
    # precision: pred pixels within 1 of target: (4,1),(4,2),(4,3) and (4,4) (next to (4,3)) → 4 of 8
    assert float(s["precision"]) == pytest.approx(4 / 8)
    assert float(s["recall"]) == 1.0
    assert float(s["f1"]) == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert float(s["iou"]) == pytest.approx(3 / 8)


def test_empty_maps():
    empty = torch.zeros(1, 8, 8, dtype=torch.bool)
    assert float(edge_overlap(empty, empty)["f1"]) == 1.0
    assert float(edge_overlap(empty, _map(LINE))["f1"]) == 0.0
    assert float(edge_overlap(_map(LINE), empty)["f1"]) == 0.0


def test_dilate_is_a_square_neighbourhood():
    d = dilate(_map([(3, 3)]), 1)[0]
    assert d.sum() == 9 and bool(d[2:5, 2:5].all())
    assert torch.equal(dilate(_map([(3, 3)]), 0), _map([(3, 3)]))


def test_canny_edges_of_a_square_and_per_image():
    img = -torch.ones(2, 3, 16, 16)
    img[0, :, 4:12, 4:12] = 1.0  # a white square on black; image 1 stays flat
    e = canny_edges(img, sigma=1.0, low_threshold=0.1, high_threshold=0.2)
    assert e.shape == (2, 16, 16) and e.dtype == torch.bool
    gray = np.zeros((16, 16))
    gray[4:12, 4:12] = 1.0
    assert torch.equal(e[0], torch.from_numpy(canny(gray, sigma=1.0, low_threshold=0.1, high_threshold=0.2)))
    assert int(e[1].sum()) == 0  # no edges in a flat image
    # the edges trace the square's border (within a pixel) and nothing inside or far outside it
    border = torch.zeros(16, 16, dtype=torch.bool)
    border[4:12, 4:12] = True
    border[5:11, 5:11] = False
    assert float(edge_overlap(e[:1], border[None])["f1"]) == 1.0
