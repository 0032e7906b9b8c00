"""Sources: bundled digits and photos, image folders, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import DataError
from pipeline.data.sources import DIGIT_WORDS, PHOTO_CROPS, PHOTO_NAMES, iter_source, source_classes


def test_digits_default_size_labels_captions() -> None:
    samples = list(iter_source("digits"))
    assert len(samples) == 1797
    s = samples[0]
    assert s["image"].shape == (16, 16, 1) and s["image"].dtype == np.uint8
    assert {x["label"] for x in samples} == set(range(10))
    for x in samples[:50]:
        assert DIGIT_WORDS[x["label"]] in x["caption"]
    assert len({x["caption"].replace(DIGIT_WORDS[x["label"]], "") for x in samples}) > 1  # varied wording
    assert len({x["key"] for x in samples}) == 1797
    assert source_classes("digits") == list(DIGIT_WORDS)


def test_digits_native_size_is_exact_scaling_and_deterministic() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits().images[:20]
    a = list(iter_source("digits", image_size=8, seed=3))[:20]
    b = list(iter_source("digits", image_size=8, seed=3))[:20]
    for x, y, r in zip(a, b, raw, strict=True):
        np.testing.assert_array_equal(x["image"][:, :, 0], np.rint(r * 255 / 16).astype(np.uint8))
        assert x["caption"] == y["caption"]
    c = [x["caption"] for x in list(iter_source("digits", image_size=8, seed=4))[:20]]
    assert c != [x["caption"] for x in a]


def test_photos_crops() -> None:
    samples = list(iter_source("photos", seed=0))
    assert len(samples) == len(PHOTO_NAMES) * PHOTO_CROPS
    assert all(s["image"].shape == (32, 32, 3) and s["image"].dtype == np.uint8 for s in samples)
    assert samples[0]["caption"] == f"a crop of the {PHOTO_NAMES[0]} photograph"
    assert [s["label"] for s in samples[::PHOTO_CROPS]] == list(range(len(PHOTO_NAMES)))
    again = list(iter_source("photos", seed=0))
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(samples, again, strict=True))
    other = next(iter(iter_source("photos", seed=1)))
    assert not np.array_equal(other["image"], samples[0]["image"])
    small = next(iter(iter_source("photos", image_size=16)))
    assert small["image"].shape == (16, 16, 3)


def _save(path: Path, size: tuple[int, int], mode: str = "RGB", value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 50, 200)).save(path)


def test_imagefolder(tmp_path: Path) -> None:
    _save(tmp_path / "zebra" / "a.png", (8, 8))
    _save(tmp_path / "zebra" / "b.png", (8, 8))
    _save(tmp_path / "cat" / "x.png", (8, 8))
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    samples = list(iter_source(f"imagefolder:{tmp_path}"))
    assert [s["label"] for s in samples] == [0, 1, 1]  # cat=0, zebra=1 (sorted)
    assert samples[0]["caption"] == "a photo of a cat"
    assert samples[1]["extra"] == {"file": "zebra/a.png"}
    assert samples[0]["image"].shape == (8, 8, 3)
    assert source_classes(f"imagefolder:{tmp_path}") == ["cat", "zebra"]


def test_imagefolder_wrong_size_names_the_file(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "1.png", (8, 8))
    _save(tmp_path / "b" / "2.png", (9, 8))
    with pytest.raises(DataError) as e:
        list(iter_source(f"imagefolder:{tmp_path}"))
    msg = str(e.value)
    assert str(tmp_path / "b" / "2.png") in msg and "9x8" in msg and "8x8" in msg and "image_size" in msg


def test_imagefolder_wrong_mode_and_resize(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "1.png", (8, 8))
    _save(tmp_path / "b" / "2.png", (8, 8), mode="L")
    with pytest.raises(DataError, match=r"2\.png.*found 8x8 L, expected 8x8 RGB"):
        list(iter_source(f"imagefolder:{tmp_path}"))
    _save(tmp_path / "b" / "3.jpg", (20, 12))
    samples = list(iter_source(f"imagefolder:{tmp_path}", image_size=6))
    assert [s["image"].shape for s in samples] == [(6, 6, 3)] * 3


def test_unknown_and_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"valid sources: digits, photos, sprites, moving-digits, imagefolder:PATH"):
        iter_source("mnist")
    with pytest.raises(DataError, match="does not exist"):
        list(iter_source(f"imagefolder:{tmp_path / 'nope'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subdirectories"):
        list(iter_source(f"imagefolder:{tmp_path / 'empty'}"))
