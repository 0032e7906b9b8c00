"""Procedural sources: sprites (known independent factors) and moving digits (bouncing sequences)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import DataError, build_dataset, load_split
from pipeline.data.procedural import (
    MOVING_FRAMES,
    MOVING_PER_DIGIT,
    SPRITE_SCALE_WORDS,
    SPRITE_SHAPES,
    bounce_trajectory,
    filmstrip_to_frames,
    frames_to_filmstrip,
    sprite_grid_sizes,
    sprite_positions,
)
from pipeline.data.sources import DIGIT_WORDS, iter_source, source_classes


@pytest.fixture(scope="module")
def sprites16() -> list[dict]:
    return list(iter_source("sprites", image_size=16))


@pytest.fixture(scope="module")
def moving() -> list[dict]:
    return list(iter_source("moving-digits", seed=3))


# ---------------------------------------------------------------- sprites


def test_sprites_cover_the_factor_grid_once_so_factors_are_independent(sprites16: list[dict]) -> None:
    sizes = sprite_grid_sizes()
    f = np.array([s["extra"]["factors"] for s in sprites16])
    assert f.shape == (int(np.prod(sizes)), 5)
    assert len({tuple(r) for r in f}) == len(f)  # every combination exactly once
    for a, b in itertools.combinations(range(5), 2):  # empirical joint == product of the marginals
        joint = np.zeros((sizes[a], sizes[b]))
        np.add.at(joint, (f[:, a], f[:, b]), 1)
        joint /= len(f)
        np.testing.assert_allclose(joint, np.outer(joint.sum(1), joint.sum(0)), atol=1e-12)
    assert [s["label"] for s in sprites16] == list(f[:, 0])
    assert source_classes("sprites") == list(SPRITE_SHAPES)


def test_sprites_are_deterministic_and_match_their_factors(sprites16: list[dict]) -> None:
    again = list(iter_source("sprites", image_size=16, seed=7))
    assert [s["key"] for s in again] == [s["key"] for s in sprites16]
    for s, t in zip(sprites16[::97], again[::97], strict=True):
        np.testing.assert_array_equal(s["image"], t["image"])
        assert s["caption"] == t["caption"] and s["extra"] == t["extra"]
    pos = sprite_positions(16)
    ink = {}
    for s in sprites16:
        shape, scale, rot, x, y = s["extra"]["factors"]
        img = s["image"][:, :, 0].astype(float)
        assert s["image"].shape == (16, 16, 1) and img.max() > 128  # small sprites: few fully covered pixels
        assert img[[0, -1]].max() == 0 and img[:, [0, -1]].max() == 0  # inside the frame
        cy, cx = (np.indices(img.shape) * img).reshape(2, -1).sum(1) / img.sum()
        assert abs(cx + 0.5 - pos[x]) < 1.5 and abs(cy + 0.5 - pos[y]) < 1.5  # the centroid is at (x, y)
        ink[(shape, scale, rot, x, y)] = img.sum()
        assert s["caption"].startswith(f"a {SPRITE_SCALE_WORDS[scale]} {SPRITE_SHAPES[shape]} ")
    for key, area in ink.items():  # a larger scale draws more ink, other factors fixed
        if key[1] < 2:
            assert ink[(key[0], key[1] + 1, *key[2:])] > area


def test_sprite_caption_words() -> None:
    s = next(iter_source("sprites", image_size=16))  # all factor indices 0: top left
    assert s["caption"] == "a small square at top left"
    with pytest.raises(DataError, match="image_size >= 12"):
        next(iter_source("sprites", image_size=8))


# ---------------------------------------------------------------- moving digits


def test_bounce_by_hand() -> None:
    pos, vel = bounce_trajectory((7, 0), (2, -1), 5, limit=8)
    # y: 7 → 9 mirrored to 7 (v flips to −2) → 5 → 3 → 1; x: 0 → −1 mirrored to 1 (v flips to +1) → 2 → 3 → 4
    np.testing.assert_array_equal(pos, [[7, 0], [7, 1], [5, 2], [3, 3], [1, 4]])
    np.testing.assert_array_equal(vel, [[2, -1], [-2, 1], [-2, 1], [-2, 1], [-2, 1]])
    with pytest.raises(DataError, match="velocity"):
        bounce_trajectory((0, 0), (9, 1), 3, limit=8)


def test_moving_digits_bounce_inside_the_frame(moving: list[dict]) -> None:
    assert len(moving) == 1797 * MOVING_PER_DIGIT and source_classes("moving-digits") == list(DIGIT_WORDS)
    flips = 0
    for s in moving:
        e = s["extra"]
        size, d = e["frame_size"], e["digit_size"]
        limit = size - d
        pos, v0 = np.array(e["positions"]), np.array(e["velocity"])
        assert pos.shape == (MOVING_FRAMES, 2) and (pos >= 0).all() and (pos <= limit).all()
        np.testing.assert_array_equal(pos[0], e["start"])
        step = np.diff(pos, axis=0)
        v = v0.copy()
        for t in range(MOVING_FRAMES - 1):  # a free step moves by v; a bounce flips v and mirrors at the border
            free = pos[t] + v
            hit = (free < 0) | (free > limit)
            expected = np.where(free < 0, -free, np.where(free > limit, 2 * limit - free, free))
            np.testing.assert_array_equal(pos[t + 1], expected)
            assert (np.abs(step[t]) <= np.abs(v)).all()
            v = np.where(hit, -v, v)
            flips += int(hit.sum())
        frames = filmstrip_to_frames(s["image"][:, :, 0], MOVING_FRAMES)
        for t, (py, px) in enumerate(pos):  # all ink lies in the digit's box at its stored position
            box = np.zeros((size, size), bool)
            box[py:py + d, px:px + d] = True
            assert frames[t][~box].max() == 0 and frames[t][box].max() > 0
    assert flips > len(moving)  # borders are actually hit


def test_moving_digits_deterministic_per_seed(moving: list[dict]) -> None:
    again = list(itertools.islice(iter_source("moving-digits", seed=3), 50))
    other = list(itertools.islice(iter_source("moving-digits", seed=4), 50))
    for a, b in zip(moving[:50], again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["extra"] == b["extra"] and a["caption"] == b["caption"]
    assert any(a["extra"]["start"] != b["extra"]["start"] for a, b in zip(moving[:50], other, strict=True))


def test_filmstrip_round_trip() -> None:
    frames = np.random.default_rng(0).integers(0, 255, (5, 4, 3)).astype(np.uint8)
    strip = frames_to_filmstrip(frames)
    assert strip.shape == (4, 15)
    np.testing.assert_array_equal(strip[:, 6:9], frames[2])
    np.testing.assert_array_equal(filmstrip_to_frames(strip, 5), frames)
    np.testing.assert_array_equal(filmstrip_to_frames(strip[None, None], 5)[0, 0], frames)  # batched
    with pytest.raises(DataError, match="does not hold"):
        filmstrip_to_frames(strip, 4)


# ---------------------------------------------------------------- shards


def test_shard_round_trip_of_factors_and_sequences(tmp_path: Path, sprites16: list[dict],
                                                   moving: list[dict]) -> None:
    m = build_dataset("sprites", tmp_path / "s", image_size=16, shard_size=1000, seed=0)
    assert m.class_names == list(SPRITE_SHAPES) and m.image_size == [16, 16, 1]
    by_key = {s["key"]: s for s in sprites16}
    for split in ("train", "test"):
        out = load_split(tmp_path / "s", split)
        assert out["factors"].shape == (len(out["key"]), 5) and out["factors"].dtype == np.int64
        for k, f, e in zip(out["key"], out["factors"], out["extra"], strict=True):
            assert list(f) == by_key[k]["extra"]["factors"] and e == by_key[k]["extra"]
        np.testing.assert_array_equal(np.rint((out["image"][0, 0] + 1) * 127.5),
                                      by_key[out["key"][0]]["image"][:, :, 0])
    build_dataset("moving-digits", tmp_path / "m", seed=3)
    out = load_split(tmp_path / "m", "test")
    assert out["image"].shape[1:] == (1, 16, 16 * MOVING_FRAMES) and "factors" not in out
    by_key = {s["key"]: s for s in moving}
    for k, e in zip(out["key"][:20], out["extra"][:20], strict=True):
        assert e["velocity"] == by_key[k]["extra"]["velocity"] and e["start"] == by_key[k]["extra"]["start"]


def test_job_spec_accepts_the_new_sources() -> None:
    from pydantic import ValidationError

    from pipeline.config import DataSpec

    assert DataSpec(source="sprites").source == "sprites"
    assert DataSpec(source="moving-digits").source == "moving-digits"
    with pytest.raises(ValidationError, match="moving-digits"):
        DataSpec(source="moving_digits")
