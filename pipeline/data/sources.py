"""Sample sources: bundled digits, bundled photographs, and a local image folder.

Every source yields :class:`Sample` dicts with a uint8 ``(H, W, C)`` image, deterministically
for a given seed. Nothing is downloaded: digits ship with scikit-learn, the photographs
with scikit-image.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from PIL import Image

from pipeline.data.errors import DataError

SOURCES = ("digits", "photos", "sprites", "moving-digits", "imagefolder:PATH")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT_CAPTIONS = (
    "a handwritten digit {w}",
    "a handwritten {w}",
    "the digit {w}, written by hand",
    "a small scan of a handwritten {w}",
)

# RGB photographs bundled in the scikit-image wheel (checked to load offline; the ones that
# need a download, e.g. eagle/lily/kidney, are left out).
PHOTO_NAMES = (
    "astronaut",
    "chelsea",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "rocket",
)
PHOTO_CROPS = 256  # crops per photograph
PHOTO_ZOOM = 4  # the photo is first downscaled so its shorter side is PHOTO_ZOOM * crop size

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class Sample(TypedDict):
    """One sample as produced by a source and consumed by the shard writer."""

    key: str  # unique, [A-Za-z0-9_-], no dots: the WebDataset key
    image: np.ndarray  # (H, W, C) uint8
    label: int
    caption: str
    extra: dict[str, Any]  # JSON-serialisable; written as <key>.json when non-empty


def iter_source(source: str, *, image_size: int | None = None, seed: int = 0) -> Iterator[Sample]:
    """Yield the samples of ``source`` ("digits", "photos", "sprites", "moving-digits" or "imagefolder:PATH")."""
    name, _, arg = source.partition(":")
    if name == "digits" and not arg:
        return _iter_digits(image_size or 16, seed)
    if name in ("sprites", "moving-digits") and not arg:  # pipeline/data/procedural.py
        from pipeline.data import procedural

        if name == "sprites":
            return procedural.iter_sprites(image_size or 32, seed)
        return procedural.iter_moving_digits(image_size or 16, seed)
    if name == "photos" and not arg:
        return _iter_photos(image_size or 32, seed)
    if name == "imagefolder" and arg:
        return _iter_imagefolder(Path(arg), image_size)
    raise DataError(f"unknown data source {source!r}; valid sources: {', '.join(SOURCES)}")


def source_classes(source: str) -> list[str]:
    """Class names of ``source``, index = label."""
    name, _, arg = source.partition(":")
    if name in ("digits", "moving-digits") and not arg:
        return list(DIGIT_WORDS)
    if name == "sprites" and not arg:
        from pipeline.data.procedural import SPRITE_SHAPES

        return list(SPRITE_SHAPES)
    if name == "photos" and not arg:
        return list(PHOTO_NAMES)
    if name == "imagefolder" and arg:
        return [d.name for d in _class_dirs(Path(arg))]
    raise DataError(f"unknown data source {source!r}; valid sources: {', '.join(SOURCES)}")


def _resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Antialiased bilinear resize to (width, height)."""
    if img.size == size:
        return img
    return img.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)


def _iter_digits(size: int, seed: int) -> Iterator[Sample]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for i, (img, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        # (8, 8) float 0..16 -> uint8 0..255
        u8 = np.clip(np.rint(img * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        pil = _resize(Image.fromarray(u8, mode="L"), (size, size))
        template = _DIGIT_CAPTIONS[int(rng.integers(len(_DIGIT_CAPTIONS)))]
        yield Sample(
            key=f"digit-{i:05d}",
            image=np.asarray(pil, dtype=np.uint8)[:, :, None],
            label=int(label),
            caption=template.format(w=DIGIT_WORDS[int(label)]),
            extra={},
        )


def _load_photo(name: str) -> np.ndarray:
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3].astype(np.uint8))


def _iter_photos(size: int, seed: int) -> Iterator[Sample]:
    for label, name in enumerate(PHOTO_NAMES):
        photo = Image.fromarray(_load_photo(name), mode="RGB")
        w, h = photo.size
        scale = PHOTO_ZOOM * size / min(w, h)
        if scale < 1:
            photo = _resize(photo, (max(size, round(w * scale)), max(size, round(h * scale))))
        arr = np.asarray(photo)
        h, w = arr.shape[:2]
        if h < size or w < size:
            raise DataError(f"photograph {name!r} is {w}x{h}, smaller than the crop size {size}")
        rng = np.random.default_rng([seed, label])
        tops = rng.integers(0, h - size + 1, size=PHOTO_CROPS)
        lefts = rng.integers(0, w - size + 1, size=PHOTO_CROPS)
        for j, (top, left) in enumerate(zip(tops, lefts, strict=True)):
            yield Sample(
                key=f"photo-{label:02d}-{j:04d}",
                image=np.ascontiguousarray(arr[top : top + size, left : left + size]),
                label=label,
                caption=f"a crop of the {name.replace('_', ' ')} photograph",
                extra={"photo": name, "top": int(top), "left": int(left), "scale": round(min(scale, 1), 6)},
            )


def _class_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist or is not a directory; expected PATH/<class_name>/*.png|jpg"
        )
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not dirs:
        raise DataError(
            f"image folder {root} has no class subdirectories; expected PATH/<class_name>/*.png|jpg"
        )
    return dirs


def _iter_imagefolder(root: Path, image_size: int | None) -> Iterator[Sample]:
    files: list[tuple[int, str, Path]] = []
    for label, d in enumerate(_class_dirs(root)):
        imgs = sorted(
            p
            for p in d.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in _IMAGE_SUFFIXES
        )
        files += [(label, d.name, p) for p in imgs]
    if not files:
        raise DataError(f"image folder {root} has no .png/.jpg images under its class subdirectories")

    # Header-only pass: modes (and readability) before any pixels are decoded.
    modes: list[str] = []
    for _, _, p in files:
        try:
            with Image.open(p) as im:
                modes.append(im.mode)
        except Exception as e:  # PIL raises several unrelated types
            raise DataError(f"cannot read image {p}: {e}") from e

    first = files[0][2]
    with Image.open(first) as im:
        expected_size, expected_mode = im.size, im.mode
    if image_size is None and expected_mode not in ("L", "RGB"):
        raise DataError(
            f"{first}: found mode {expected_mode}, expected L or RGB; pass image_size to convert and resize"
        )
    # With image_size: grayscale only if every image is, else RGB.
    target_mode = "L" if all(m in ("L", "1") for m in modes) else "RGB"

    counters: dict[int, int] = {}
    for label, cls, p in files:
        with Image.open(p) as im:
            im.load()
            if image_size is None:
                if im.size != expected_size or im.mode != expected_mode:
                    raise DataError(
                        f"{p}: found {im.size[0]}x{im.size[1]} {im.mode}, expected "
                        f"{expected_size[0]}x{expected_size[1]} {expected_mode} (like {first}); "
                        "pass image_size to resize and convert every image"
                    )
                out = im.copy()
            else:
                out = _center_resize(im.convert(target_mode), image_size)
        arr = np.asarray(out, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        i = counters.get(label, 0)
        counters[label] = i + 1
        yield Sample(
            key=f"img-{label:04d}-{i:06d}",
            image=arr,
            label=label,
            caption=f"a photo of a {cls.replace('_', ' ')}",
            extra={"file": str(p.relative_to(root))},
        )


def _center_resize(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (antialiased), then center-crop to size x size."""
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = _resize(img, (nw, nh))
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))
