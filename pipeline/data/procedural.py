"""Procedural sources with known generative factors: ``sprites`` and ``moving-digits``.

``sprites`` (dSprites-like): grayscale images of one white shape on black, drawn from five
independent discrete factors — shape (square, ellipse, triangle, heart), scale, rotation, x, y.
Every combination of the factor grid appears exactly once (a full factorial design), so the
factors are exactly independent and uniformly covered; the build's held-out split is a random
subset of it. The factor indices are stored per sample in ``extra["factors"]`` (written as
``<key>.json`` in the shards), ``label`` is the shape, the caption says e.g.
"a small heart at top left".

``moving-digits`` (Moving-MNIST-like, for TD-VAE): sequences of ``MOVING_FRAMES`` frames of one
bundled scikit-learn digit moving with a constant integer velocity and bouncing off the borders.
A sequence is stored as one **filmstrip** image: the frames side by side, ``(H, T * W, 1)`` uint8,
frame ``t`` in columns ``[t * W, (t + 1) * W)``. The shard writer, Ray Data and the training loop
carry it unchanged as an ordinary grayscale image ``(1, H, T * W)``; the sequence models split it
back into frames (:func:`filmstrip_to_frames`). ``extra`` holds the start position, velocity and
every frame's position.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.errors import DataError
from pipeline.data.sources import DIGIT_WORDS, Sample

# ---------------------------------------------------------------- sprites

SPRITE_SHAPES = ("square", "ellipse", "triangle", "heart")
SPRITE_FACTORS = ("shape", "scale", "rotation", "x", "y")
SPRITE_SCALES = (0.12, 0.17, 0.22)  # radius as a fraction of the image side
SPRITE_SCALE_WORDS = ("small", "medium", "large")
SPRITE_ROTATIONS = (0.0, 22.5, 45.0, 67.5)  # degrees; distinct for every shape (none has 22.5° symmetry)
SPRITE_POSITIONS = 8  # grid points per axis
SPRITE_SUPERSAMPLE = 4  # drawn at 4x and downsampled: antialiased edges


def sprite_grid_sizes() -> tuple[int, ...]:
    """Number of values of each factor, in ``SPRITE_FACTORS`` order."""
    return (len(SPRITE_SHAPES), len(SPRITE_SCALES), len(SPRITE_ROTATIONS), SPRITE_POSITIONS, SPRITE_POSITIONS)


def _unit_outline(shape: str) -> np.ndarray:
    """Outline of ``shape`` as (P, 2) points (x right, y down) inside the unit disc."""
    t = np.linspace(0.0, 2.0 * np.pi, 64, endpoint=False)
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.7  # corners at 0.99
    if shape == "ellipse":
        return np.stack([np.cos(t), 0.55 * np.sin(t)], 1)
    if shape == "triangle":
        a = np.deg2rad(np.array([-90.0, 30.0, 150.0]))
        return np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "heart":
        x = 16.0 * np.sin(t) ** 3
        y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y + 2.5], 1)  # roughly centred on its area
        return pts / np.abs(pts).max()
    raise DataError(f"unknown sprite shape {shape!r}")


def sprite_positions(size: int) -> np.ndarray:
    """Centre coordinates (pixels) of the position grid: the largest sprite stays inside the image."""
    margin = SPRITE_SCALES[-1] * size + 1.5
    return np.linspace(margin, size - margin, SPRITE_POSITIONS)


def render_sprite(size: int, shape: int, scale: int, rotation: int, x: int, y: int) -> np.ndarray:
    """The uint8 (size, size) image of one factor combination (factor indices)."""
    ss = SPRITE_SUPERSAMPLE
    pos = sprite_positions(size)
    radius = SPRITE_SCALES[scale] * size
    a = np.deg2rad(SPRITE_ROTATIONS[rotation])
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    pts = _unit_outline(SPRITE_SHAPES[shape]) @ rot.T * radius + np.array([pos[x], pos[y]])
    canvas = Image.new("L", (size * ss, size * ss), 0)
    ImageDraw.Draw(canvas).polygon([(float(px * ss), float(py * ss)) for px, py in pts], fill=255)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def _where(i: int, words: tuple[str, str, str]) -> str:
    third = SPRITE_POSITIONS / 3
    return words[0] if i < third else words[2] if i >= SPRITE_POSITIONS - third else words[1]


def sprite_caption(shape: int, scale: int, x: int, y: int) -> str:
    """E.g. "a small heart at top left"; the centre cell reads "in the center"."""
    v, h = _where(y, ("top", "middle", "bottom")), _where(x, ("left", "center", "right"))
    where = "in the center" if (v, h) == ("middle", "center") else f"at {v} {h}"
    return f"a {SPRITE_SCALE_WORDS[scale]} {SPRITE_SHAPES[shape]} {where}"


def iter_sprites(size: int = 32, seed: int = 0) -> Iterator[Sample]:
    """Every factor combination once, in grid order (the seed is accepted for uniformity; the grid is fixed)."""
    del seed  # a full factorial design has nothing to draw
    if size < 12:
        raise DataError(f"sprites need image_size >= 12, got {size}")
    pos = sprite_positions(size)
    for idx in np.ndindex(*sprite_grid_sizes()):
        shape, scale, rotation, x, y = (int(i) for i in idx)
        yield Sample(
            key="sprite-" + "".join(str(i) for i in idx),
            image=render_sprite(size, shape, scale, rotation, x, y)[:, :, None],
            label=shape,
            caption=sprite_caption(shape, scale, x, y),
            extra={
                "factors": [shape, scale, rotation, x, y],
                "factor_names": list(SPRITE_FACTORS),
                "values": {"scale_px": round(SPRITE_SCALES[scale] * size, 4),
                           "rotation_deg": SPRITE_ROTATIONS[rotation],
                           "x_px": round(float(pos[x]), 4), "y_px": round(float(pos[y]), 4)},
            },
        )


# ---------------------------------------------------------------- moving digits

MOVING_FRAMES = 12  # frames per sequence
MOVING_PER_DIGIT = 2  # sequences per bundled digit image (3594 in all)
MOVING_SPEEDS = (-2, -1, 1, 2)  # pixels per frame, per axis
_DIRECTIONS = {(-1, -1): "up-left", (-1, 1): "up-right", (1, -1): "down-left", (1, 1): "down-right"}


def bounce_trajectory(start: tuple[int, int], velocity: tuple[int, int], steps: int, limit: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Positions and velocities ``(steps, 2)`` of a point moving in ``[0, limit]^2``, reflecting at the borders.

    p_{t+1} = p_t + v_t; a coordinate that would leave the box is mirrored back in (−p or 2·limit − p) and
    that velocity component flips sign. Needs |v| <= limit.
    """
    p = np.array(start, dtype=np.int64)
    v = np.array(velocity, dtype=np.int64)
    if np.any(np.abs(v) > limit) or np.any(p < 0) or np.any(p > limit):
        raise DataError(f"bounce needs 0 <= start <= {limit} and |velocity| <= {limit}, got {start}, {velocity}")
    pos, vel = np.empty((steps, 2), np.int64), np.empty((steps, 2), np.int64)
    for t in range(steps):
        pos[t], vel[t] = p, v
        p = p + v
        low, high = p < 0, p > limit
        p = np.where(low, -p, np.where(high, 2 * limit - p, p))
        v = np.where(low | high, -v, v)
    return pos, vel


def frames_to_filmstrip(frames: np.ndarray) -> np.ndarray:
    """(T, H, W) -> (H, T * W): frames side by side."""
    t, h, w = frames.shape
    return np.ascontiguousarray(frames.transpose(1, 0, 2).reshape(h, t * w))


def filmstrip_to_frames(strip: np.ndarray, frames: int) -> np.ndarray:
    """(..., H, T * W) -> (..., T, H, W): the inverse of :func:`frames_to_filmstrip`."""
    *lead, h, tw = strip.shape
    if tw % frames:
        raise DataError(f"a filmstrip of width {tw} does not hold {frames} frames")
    w = tw // frames
    x = strip.reshape(*lead, h, frames, w)
    return np.moveaxis(x, -2, -3)


def iter_moving_digits(size: int = 16, seed: int = 0) -> Iterator[Sample]:
    """``MOVING_PER_DIGIT`` bouncing sequences per bundled digit; start and velocity drawn from ``seed``."""
    from sklearn.datasets import load_digits

    digit = max(4, round(size / 2))  # the digit's side; the native 8x8 at the default 16x16 frames
    limit = size - digit
    if limit < max(MOVING_SPEEDS):
        raise DataError(f"moving-digits need image_size >= {2 * max(MOVING_SPEEDS) + 2}, got {size}")
    digits = load_digits()
    rng = np.random.default_rng([seed, 0x30D1])
    for i, (img, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        u8 = np.clip(np.rint(img * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        if digit != 8:
            u8 = np.asarray(Image.fromarray(u8, mode="L").resize((digit, digit), Image.Resampling.BILINEAR))
        for j in range(MOVING_PER_DIGIT):
            start = (int(rng.integers(0, limit + 1)), int(rng.integers(0, limit + 1)))  # (y, x) of the top-left
            velocity = (int(rng.choice(MOVING_SPEEDS)), int(rng.choice(MOVING_SPEEDS)))
            pos, _ = bounce_trajectory(start, velocity, MOVING_FRAMES, limit)
            frames = np.zeros((MOVING_FRAMES, size, size), np.uint8)
            for t, (py, px) in enumerate(pos):
                frames[t, py:py + digit, px:px + digit] = u8
            direction = _DIRECTIONS[(int(np.sign(velocity[0])), int(np.sign(velocity[1])))]
            yield Sample(
                key=f"movdig-{i:04d}-{j}",
                image=frames_to_filmstrip(frames)[:, :, None],
                label=int(label),
                caption=f"a handwritten {DIGIT_WORDS[int(label)]} moving {direction}",
                extra={"digit_index": i, "frames": MOVING_FRAMES, "frame_size": size, "digit_size": digit,
                       "layout": "filmstrip", "start": list(start), "velocity": list(velocity),
                       "positions": pos.tolist()},
            )
