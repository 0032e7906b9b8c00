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

IMAGE_EXTS = ("png", "jpg", "jpeg")
KNOWN_EXTS = (*IMAGE_EXTS, "npy", "cls", "txt", "json")


def decode_image_u8(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 (C, H, W)."""
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


def check_on_corrupt(on_corrupt: str) -> OnCorrupt:
    """Validate an ``on_corrupt`` argument."""
    if on_corrupt not in ("skip", "fail"):
        raise ValueError(f"on_corrupt must be 'skip' or 'fail', got {on_corrupt!r}")
    return on_corrupt  # type: ignore[return-value]
