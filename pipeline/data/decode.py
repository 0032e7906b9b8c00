"""Safe decoding of WebDataset samples: only the member types we write, never pickle.

No ``pickle``, no ``torch.load``: a ``.pyd``/``.pth``/``.pickle`` member is ignored, not
decoded. ``.npy`` is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import json
from typing import Any, Literal

import numpy as np
from PIL import Image

from pipeline.data.errors import DataError

OnCorrupt = Literal["skip", "fail"]

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
KNOWN_EXTS = (*IMAGE_EXTS, "npy", "cls", "txt", "json")


def decode_image_u8(data: bytes) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> uint8 (C, H, W)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))  # (H, W, C) -> (C, H, W)


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1] (the one conversion, wherever it runs)."""
    return image.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> float32 (C, H, W) in [-1, 1]."""
    return to_unit_range(decode_image_u8(data))


def decode_npy(data: bytes) -> np.ndarray:
    """.npy bytes -> float32 array; refuses object arrays (which would need pickle)."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"expected a numeric array, found dtype {getattr(arr, 'dtype', type(arr))}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _decode_member(ext: str, data: bytes, uint8: bool = False) -> tuple[str, Any]:
    if ext in IMAGE_EXTS:
        return "image", decode_image_u8(data) if uint8 else decode_image(data)
    if ext == "npy":
        return "image", decode_npy(data)
    if ext == "cls":
        return "label", int(data.decode("ascii").strip())
    if ext == "txt":
        return "caption", data.decode("utf-8")
    if ext == "json":
        extra = json.loads(data.decode("utf-8"))
        if not isinstance(extra, dict):
            raise ValueError(f"expected a JSON object, found {type(extra).__name__}")
        return "extra", extra
    raise AssertionError(ext)


def decode_sample(members: dict[str, Any], *, uint8: bool = False) -> dict[str, Any]:
    """Decode one sample's members (``{ext: bytes}``, plus optional ``__key__``/``__url__``).

    Returns ``{"key", "image" (float32, CHW for images), "label" (int), "caption" (str),
    "extra" (dict)}`` for the members present; unknown extensions are ignored. A member
    that fails to decode raises :class:`DataError` naming the sample key and the shard.
    """
    key = str(members.get("__key__", "?"))
    out: dict[str, Any] = {"key": key}
    for ext, data in members.items():
        if ext not in KNOWN_EXTS:
            continue  # includes pyd/pth/pickle: never deserialised
        try:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise TypeError(f"expected bytes, found {type(data).__name__}")
            name, value = _decode_member(ext, bytes(data), uint8)
        except Exception as e:
            shard = members.get("__url__", "?")
            raise DataError(f"corrupt member {key}.{ext} in shard {shard}: {type(e).__name__}: {e}") from e
        if name in out:
            shard = members.get("__url__", "?")
            raise DataError(f"sample {key} in shard {shard} has two {name} members")
        out[name] = value
    return out


def check_decoded(
    sample: dict[str, Any], shard: str, expected_shape: tuple[int, ...] | None
) -> dict[str, Any]:
    """Require image and label members and (if given) the expected image shape."""
    missing = [k for k in ("image", "label") if k not in sample]
    if missing:
        raise DataError(f"sample {sample['key']} in shard {shard} has no {' or '.join(missing)} member")
    if expected_shape is not None and tuple(sample["image"].shape) != tuple(expected_shape):
        raise DataError(
            f"sample {sample['key']} in shard {shard}: image shape {tuple(sample['image'].shape)}, "
            f"manifest says {tuple(expected_shape)}"
        )
    return sample


def fit_image(image: np.ndarray, shape: tuple[int, int, int], draw: int | None = None) -> np.ndarray:
    """uint8 (C, H, W) of any size -> uint8 ``shape`` (C', S, S): converted to L (C'=1) or RGB (C'=3), the shorter
    side resized to S (bicubic, antialiased), then an S x S crop: at the center (``draw`` None), or at the offset
    ``(draw mod (dy+1), (draw >> 32) mod (dx+1))`` (``dy, dx`` the slack of the resized image)."""
    c, size = shape[0], shape[1]
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[image.shape[0]]
    pil = Image.fromarray(np.ascontiguousarray(image[0] if mode == "L" else image.transpose(1, 2, 0)), mode=mode)
    pil = pil.convert("L" if c == 1 else "RGB")
    h, w = pil.height, pil.width
    nh, nw = max(size, round(h * size / min(h, w))), max(size, round(w * size / min(h, w)))
    if (nh, nw) != (h, w):
        pil = pil.resize((nw, nh), Image.Resampling.BICUBIC)
    dy, dx = nh - size, nw - size
    y, x = (dy // 2, dx // 2) if draw is None else (draw % (dy + 1), (draw >> 32) % (dx + 1))
    arr = np.asarray(pil.crop((x, y, x + size, y + size)), dtype=np.uint8)
    return np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))


def decode_fitted(members: dict[str, Any], shape: tuple[int, ...], *, resize: bool, default_label: int | None,
                  draw: int | None = None, uint8: bool = False) -> dict[str, Any]:
    """:func:`decode_sample` for a manifest that does not promise sizes (``resize``: images go through
    :func:`fit_image` to ``shape`` with ``draw``) or labels (``default_label`` for a sample without ``.cls``)."""
    if not resize and default_label is None:
        return decode_sample(members, uint8=uint8)
    sample = decode_sample(members, uint8=True)
    image = sample.get("image")
    if image is not None and image.dtype == np.uint8:
        sample["image"] = fit_image(image, shape, draw) if resize else image  # type: ignore[arg-type]
        if not uint8:
            sample["image"] = to_unit_range(sample["image"])
    if default_label is not None:
        sample.setdefault("label", default_label)
    return sample


def check_on_corrupt(on_corrupt: str) -> OnCorrupt:
    """Validate an ``on_corrupt`` argument."""
    if on_corrupt not in ("skip", "fail"):
        raise ValueError(f"on_corrupt must be 'skip' or 'fail', got {on_corrupt!r}")
    return on_corrupt  # type: ignore[return-value]
