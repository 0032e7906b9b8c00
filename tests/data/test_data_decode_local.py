"""Safe decoding (nothing is ever unpickled), corrupt members, and the local iterator."""

from __future__ import annotations

import inspect
import io
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import DataError, iterate_batches, load_split, read_manifest, write_shards
from pipeline.data.decode import decode_sample
from pipeline.data.local import ReadStats, iter_samples, iter_tar_samples
from pipeline.data.shards import encode_png
from tests.data.datatest_helpers import MakesDir, make_samples, write_raw_tar


def _evil_payloads(marker: Path) -> dict[str, bytes]:
    payload = pickle.dumps(MakesDir(str(marker)))
    obj_npy = io.BytesIO()
    np.save(obj_npy, np.array([MakesDir(str(marker))], dtype=object), allow_pickle=True)
    return {"pyd": payload, "pth": payload, "pickle": payload, "pkl": payload, "evil_npy": obj_npy.getvalue()}


def test_pickled_members_are_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _evil_payloads(marker)
    img = make_samples(1)[0]["image"]
    members = {"__key__": "k", "png": encode_png(img), "cls": b"3", "txt": b"hi"}
    members.update({k: v for k, v in evil.items() if k != "evil_npy"})
    out = decode_sample(members)
    assert set(out) == {"key", "image", "label", "caption"}
    assert not marker.exists()
    with pytest.raises(DataError, match=r"corrupt member k\.npy in shard s\.tar"):
        decode_sample({"__key__": "k", "__url__": "s.tar", "npy": evil["evil_npy"]})
    assert not marker.exists()
    # the same bytes through the whole local reader
    shard = tmp_path / "x.tar"
    write_raw_tar(shard, [{k: v for k, v in members.items()}])
    assert [s["label"] for s in iter_samples([str(shard)])] == [3]
    assert not marker.exists()
    # ...and the payload is live: a naive reader would have run it
    pickle.loads(evil["pyd"])
    assert marker.is_dir()


def test_decode_members() -> None:
    img = make_samples(1, channels=1)[0]["image"]
    d = decode_sample(
        {
            "__key__": "a",
            "png": encode_png(img),
            "cls": b"7\n",
            "txt": "ü".encode(),
            "json": b'{"x": 1}',
            "zzz": b"?",
        }
    )
    assert (
        d["image"].shape == (1, 8, 8) and d["label"] == 7 and d["caption"] == "ü" and d["extra"] == {"x": 1}
    )
    for ext, data in [
        ("cls", b"seven"),
        ("txt", b"\xff\xfe"),
        ("json", b"[1]"),
        ("json", b"{"),
        ("npy", b"nope"),
    ]:
        with pytest.raises(DataError, match=rf"corrupt member a\.{ext} in shard u"):
            decode_sample({"__key__": "a", "__url__": "u", ext: data})


def _corrupt_dataset(digits_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the digits dataset whose test shard has one corrupt PNG (same byte count)."""
    d = tmp_path / "ds"
    shutil.copytree(digits_dir, d)
    name = read_manifest(d).splits["test"].shards[0].name
    samples = [dict(s) for s in iter_tar_samples(d / name)]
    victim = samples[5]
    victim["png"] = b"\x89PNG\r\n\x1a\n" + b"\x00" * (len(victim["png"]) - 8)
    write_raw_tar(d / name, [{k: v for k, v in s.items() if k != "__url__"} for s in samples])
    return d, victim["__key__"]


def test_corrupt_png_fail_and_skip(digits_dir: Path, tmp_path: Path) -> None:
    d, key = _corrupt_dataset(digits_dir, tmp_path)
    with pytest.raises(DataError, match=rf"corrupt member {key}\.png in shard .*test-000000\.tar"):
        load_split(d, "test")
    out = load_split(d, "test", on_corrupt="skip")
    n_test = read_manifest(d).splits["test"].num_samples
    assert out["skipped"] == 1 and len(out["label"]) == n_test - 1 and key not in out["key"]
    stats = ReadStats()
    n = sum(
        len(b["label"])
        for b in iterate_batches(d, "test", 10, epochs=1, drop_last=False, on_corrupt="skip", stats=stats)
    )
    assert n == n_test - 1 and stats.skipped == 1 and stats.skipped_keys == [key]
    with pytest.raises(DataError, match=key):
        list(iterate_batches(d, "test", 10, epochs=1))
    with pytest.raises(ValueError, match="on_corrupt"):
        load_split(d, "test", on_corrupt="ignore")  # type: ignore[arg-type]


def test_iterate_batches(digits_dir: Path) -> None:
    m = read_manifest(digits_dir)
    n_train = m.splits["train"].num_samples
    batches = list(iterate_batches(digits_dir, "train", 64, epochs=1))
    assert len(batches) == n_train // 64
    b = batches[0]
    assert b["image"].shape == (64, 1, 8, 8) and b["image"].dtype == torch.float32
    assert b["label"].shape == (64,) and b["label"].dtype == torch.int64
    assert isinstance(b["caption"], list) and len(b["caption"]) == 64 and isinstance(b["caption"][0], str)
    # one epoch without drop_last visits every sample once
    keys = [k for b in iterate_batches(digits_dir, "train", 64, epochs=1, drop_last=False) for k in b["key"]]
    assert len(keys) == n_train == len(set(keys))
    # determinism and per-epoch reshuffling
    a = [k for b in iterate_batches(digits_dir, "train", 64, epochs=2, seed=5) for k in b["key"]]
    again = [k for b in iterate_batches(digits_dir, "train", 64, epochs=2, seed=5) for k in b["key"]]
    other = [k for b in iterate_batches(digits_dir, "train", 64, epochs=2, seed=6) for k in b["key"]]
    half = len(a) // 2
    assert a == again and a != other and a[:half] != a[half:]
    # no shuffle: manifest order; infinite epochs keep going
    plain = [
        k
        for b in iterate_batches(digits_dir, "train", 64, shuffle=False, epochs=1, drop_last=False)
        for k in b["key"]
    ]
    assert plain == load_split(digits_dir, "train")["key"]
    it = iterate_batches(digits_dir, "test", 100)
    assert sum(1 for _ in zip(range(10), it, strict=False)) == 10
    with pytest.raises(DataError, match="yields no batch of 5000"):
        next(iterate_batches(digits_dir, "test", 5000))


def test_load_split_matches_source(digits_dir: Path) -> None:
    from pipeline.data.sources import iter_source

    by_key = {s["key"]: s for s in iter_source("digits", image_size=8, seed=0)}
    out = load_split(digits_dir, "test")
    assert out["image"].shape[1:] == (1, 8, 8) and out["image"].dtype == np.float32 and out["skipped"] == 0
    for img, label, cap, key in zip(out["image"], out["label"], out["caption"], out["key"], strict=True):
        src = by_key[key]
        np.testing.assert_array_equal(
            np.rint((img + 1) * 127.5).astype(np.uint8), src["image"].transpose(2, 0, 1)
        )
        assert label == src["label"] and cap == src["caption"]


def test_shape_mismatch_is_corrupt(tmp_path: Path) -> None:
    write_shards(make_samples(4, size=8), tmp_path)
    good = [s["label"] for s in iter_samples([str(tmp_path / "train-000000.tar")], expected_shape=(3, 8, 8))]
    assert len(good) == 4
    with pytest.raises(DataError, match=r"image shape \(3, 8, 8\), manifest says \(3, 9, 9\)"):
        list(iter_samples([str(tmp_path / "train-000000.tar")], expected_shape=(3, 9, 9)))


def test_load_split_limit_reads_a_bounded_prefix(digits_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`limit=k` gives exactly the first k samples of the whole read and decodes no more than k."""
    import pipeline.data.local as local

    whole = load_split(digits_dir, "train", limit=None)
    n = len(whole["key"])
    assert len(read_manifest(digits_dir).splits["train"].shards) >= 3
    assert inspect.signature(load_split).parameters["limit"].default == local.HELD_OUT_LIMIT  # bounded by default
    for k in (1, 5, 301, n, n + 10):  # 301 crosses a shard boundary (300 per shard)
        part = load_split(digits_dir, "train", limit=k)
        m = min(k, n)
        assert part["key"] == whole["key"][:m] and part["caption"] == whole["caption"][:m]
        np.testing.assert_array_equal(part["image"], whole["image"][:m])
        np.testing.assert_array_equal(part["label"], whole["label"][:m])
    decoded: list[str] = []

    def counting(raw: dict) -> dict:
        decoded.append(raw["__key__"])
        return decode_sample(raw)

    monkeypatch.setattr(local, "decode_sample", counting)
    assert load_split(digits_dir, "train", limit=5)["key"] == whole["key"][:5]
    assert decoded == whole["key"][:5]  # lazily: 5 decodes, not the whole split
    with pytest.raises(DataError, match="limit must be >= 1"):
        load_split(digits_dir, "train", limit=0)
