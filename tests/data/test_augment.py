"""Augmentations used in Ray Data tasks."""

import numpy as np

from pipeline.data.augment import augment_batch


def test_shift_moves_content_and_pads_with_black():
    img = np.full((64, 1, 8, 8), -1.0, dtype=np.float32)
    img[:, :, 3:5, 3:5] = 1.0
    out = augment_batch({"image": img, "label": np.arange(64)}, shift=2, seed=0)["image"]
    assert out.shape == img.shape
    # the bright square keeps its size (2x2 inside an 8x8 frame with a shift of at most 2) ...
    assert np.all((out == 1.0).sum(axis=(1, 2, 3)) == 4)
    # ... but not always its place
    moved = [np.argwhere(o[0] == 1.0)[0].tolist() for o in out]
    assert len({tuple(m) for m in moved}) > 5
    assert all(abs(r - 3) <= 2 and abs(c - 3) <= 2 for r, c in moved)


def test_hflip_flips_about_half_and_exactly():
    img = np.random.default_rng(1).standard_normal((200, 1, 4, 4)).astype(np.float32)
    out = augment_batch({"image": img}, hflip=True, seed=3)["image"]
    flipped = np.array([np.array_equal(o, i[..., ::-1]) for o, i in zip(out, img, strict=True)])
    same = np.array([np.array_equal(o, i) for o, i in zip(out, img, strict=True)])
    assert np.all(flipped ^ same)
    assert 60 < flipped.sum() < 140


def test_no_augmentation_is_identity():
    batch = {"image": np.zeros((2, 1, 4, 4), np.float32)}
    assert augment_batch(batch) is batch
