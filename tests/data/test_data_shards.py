"""Shard writing: byte-exact round trip, ustar format, manifest, split, atomicity, verification."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import (
    DataError,
    build_dataset,
    manifest_sha256,
    read_manifest,
    shard_paths,
    verify_shards,
    write_array_shards,
    write_shards,
)
from pipeline.data.decode import decode_sample
from pipeline.data.local import iter_tar_samples
from pipeline.data.shards import encode_png
from tests.data.datatest_helpers import make_samples

REPO = Path(__file__).resolve().parents[2]


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


def test_round_trip_byte_for_byte(tmp_path: Path) -> None:
    samples = make_samples(7, channels=3) + make_samples(3, channels=1, seed=1)
    for i, s in enumerate(samples[7:]):
        s["key"] = f"gray-{i}"
    infos = write_shards(samples, tmp_path, prefix="train", shard_size=4)
    assert [i.num_samples for i in infos] == [4, 4, 2]
    assert [i.name for i in infos] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    raw = [r for i in infos for r in iter_tar_samples(tmp_path / i.name)]
    assert [r["__key__"] for r in raw] == [s["key"] for s in samples]
    for s, r in zip(samples, raw, strict=True):
        assert r["png"] == encode_png(s["image"])  # PNG bytes out == PNG bytes in
        pixels = np.asarray(Image.open(io.BytesIO(r["png"])))  # independent decoder
        np.testing.assert_array_equal(pixels.reshape(s["image"].shape), s["image"])
        d = decode_sample(r)
        np.testing.assert_array_equal(
            np.rint((d["image"] + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0), s["image"]
        )
        assert d["image"].dtype == np.float32 and d["image"].min() >= -1 and d["image"].max() <= 1
        assert d["label"] == s["label"] and r["cls"] == str(s["label"]).encode()
        assert d["caption"] == s["caption"]
        assert d.get("extra", {}) == s["extra"]
        assert ("json" in r) == bool(s["extra"])


def test_plain_ustar_deterministic(tmp_path: Path) -> None:
    samples = make_samples(5)
    a = write_shards(samples, tmp_path / "a", shard_size=10)
    b = write_shards(samples, tmp_path / "b", shard_size=10)
    assert a[0].sha256 == b[0].sha256
    path = tmp_path / "a" / a[0].name
    data = path.read_bytes()
    members = _members(path)
    for m in members:
        assert m.type == tarfile.REGTYPE and m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == ""
        header = data[m.offset : m.offset + 512]
        assert header[257:265] == b"ustar\x0000"  # POSIX ustar magic, no pax/gnu headers
    names = [m.name for m in members]
    assert names[:3] == ["s-0000.cls", "s-0000.png", "s-0000.txt"]  # sorted within each sample
    assert len(data) == a[0].bytes and hashlib.sha256(data).hexdigest() == a[0].sha256


def test_array_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [
        {"key": f"z-{i}", "array": rng.normal(size=(4, 2, 2)).astype(np.float64), "label": i, "caption": "c"}
        for i in range(3)
    ]
    infos = write_array_shards(rows, tmp_path, prefix="latents", shard_size=2)
    assert [i.name for i in infos] == ["latents-000000.tar", "latents-000001.tar"]
    raw = [r for i in infos for r in iter_tar_samples(tmp_path / i.name)]
    for row, r in zip(rows, raw, strict=True):
        assert set(r) == {"__key__", "__url__", "npy", "cls", "txt"}
        arr = np.load(io.BytesIO(r["npy"]), allow_pickle=False)
        assert arr.dtype == np.float32
        d = decode_sample(r)
        np.testing.assert_array_equal(d["image"], row["array"].astype(np.float32))
        assert d["label"] == row["label"] and d["caption"] == "c"


def test_bad_keys_rejected(tmp_path: Path) -> None:
    s = make_samples(2)
    s[1]["key"] = s[0]["key"]
    with pytest.raises(DataError, match="duplicate sample key"):
        write_shards(s, tmp_path)
    s[1]["key"] = "a.b"
    with pytest.raises(DataError, match="no dots"):
        write_shards(s, tmp_path / "x")
    assert not list(tmp_path.glob("**/*.tar")) and not list(tmp_path.glob("**/.*tmp*"))


def test_manifest_counts_and_sha(digits_dir: Path) -> None:
    m = read_manifest(digits_dir)
    assert m.source == "digits" and m.image_size == [8, 8, 1] and m.num_classes == 10
    assert m.class_names is not None and m.class_names[7] == "seven"
    assert m.splits["train"].num_samples + m.splits["test"].num_samples == 1797
    on_disk = json.loads((digits_dir / "manifest.json").read_text())
    assert set(on_disk) >= {"source", "created_by", "image_size", "num_classes", "class_names", "splits"}
    assert on_disk["created_by"].startswith("genpipe ")
    for name, split in m.splits.items():
        assert sum(split.labels.values()) == split.num_samples
        for sh in split.shards:
            data = (digits_dir / sh.name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == sh.sha256 and len(data) == sh.bytes
            n = sum(1 for _ in iter_tar_samples(digits_dir / sh.name))
            assert n == sh.num_samples
        assert [Path(p).name for p in shard_paths(digits_dir, name)] == [sh.name for sh in split.shards]
    assert m.splits["train"].shards[0].num_samples == 300
    assert (
        manifest_sha256(digits_dir) == hashlib.sha256((digits_dir / "manifest.json").read_bytes()).hexdigest()
    )
    verify_shards(digits_dir)
    with pytest.raises(DataError, match="no split 'val'; splits: train, test"):
        shard_paths(digits_dir, "val")


def test_split_is_stratified_disjoint_and_deterministic(digits_dir: Path, tmp_path: Path) -> None:
    keys: dict[str, set[str]] = {}
    labels: dict[str, list[int]] = {}
    for split in ("train", "test"):
        raws = [r for p in shard_paths(digits_dir, split) for r in iter_tar_samples(p)]
        keys[split] = {r["__key__"] for r in raws}
        labels[split] = [int(r["cls"]) for r in raws]
    assert not keys["train"] & keys["test"]
    assert len(keys["train"] | keys["test"]) == 1797
    train_counts = np.bincount(labels["train"], minlength=10)
    test_counts = np.bincount(labels["test"], minlength=10)
    for c in range(10):
        total = train_counts[c] + test_counts[c]
        assert test_counts[c] == round(0.15 * total)
    m = read_manifest(digits_dir)
    assert m.splits["test"].labels == {c: int(test_counts[c]) for c in range(10)}
    # shards mix labels (the split is shuffled before writing)
    first = [int(r["cls"]) for r in iter_tar_samples(shard_paths(digits_dir, "train")[0])]
    assert len(set(first[:50])) > 5
    # same seed -> same bytes; other seed -> other split
    again = build_dataset("digits", tmp_path / "again", image_size=8, shard_size=300, seed=0)
    assert manifest_sha256(tmp_path / "again") == manifest_sha256(digits_dir)
    other = build_dataset("digits", tmp_path / "other", image_size=8, shard_size=300, seed=1)
    assert other.splits["test"].shards[0].sha256 != again.splits["test"].shards[0].sha256


def _assert_no_partial(directory: Path, shard_size: int) -> list[str]:
    """Every file with a final shard name is a complete tar of shard_size samples."""
    finals = sorted(p.name for p in directory.glob("*.tar"))
    for name in finals:
        assert sum(1 for _ in iter_tar_samples(directory / name)) == shard_size
    return finals


def test_crash_mid_write_leaves_no_partial_shard(tmp_path: Path) -> None:
    def crashing():
        for i, s in enumerate(make_samples(30)):
            if i == 25:
                raise RuntimeError("boom")
            yield s

    with pytest.raises(RuntimeError, match="boom"):
        write_shards(crashing(), tmp_path, shard_size=10)
    assert _assert_no_partial(tmp_path, 10) == ["train-000000.tar", "train-000001.tar"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp file removed


def test_hard_kill_mid_write_leaves_no_partial_shard(tmp_path: Path) -> None:
    code = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
from tests.data.datatest_helpers import make_samples
from pipeline.data import write_shards
def samples():
    for i, s in enumerate(make_samples(30)):
        if i == 25:
            os._exit(3)   # no cleanup, no finally: like a kill
        yield s
write_shards(samples(), {str(tmp_path)!r}, shard_size=10)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert _assert_no_partial(tmp_path, 10) == ["train-000000.tar", "train-000001.tar"]
    leftovers = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".tar")]
    assert all(n.startswith(".train-000002.tar.tmp-") for n in leftovers)  # hidden, never a final name


def test_build_crash_writes_no_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.data.shards as shards

    out = tmp_path / "ds"
    build_dataset("digits", out, image_size=8, shard_size=500)
    with pytest.raises(DataError, match="already holds a dataset"):
        build_dataset("digits", out, image_size=8)

    real = shards._sample_members
    calls = {"n": 0}

    def flaky(s):
        calls["n"] += 1
        if calls["n"] == 700:
            raise OSError("disk full")
        return real(s)

    monkeypatch.setattr(shards, "_sample_members", flaky)
    with pytest.raises(OSError, match="disk full"):
        build_dataset("digits", out, image_size=8, shard_size=256, overwrite=True)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob(".*"))
    with pytest.raises(DataError, match="no manifest.json: an unfinished or interrupted build"):
        read_manifest(out)
    monkeypatch.setattr(shards, "_sample_members", real)
    m = build_dataset("digits", out, image_size=8, shard_size=256, overwrite=True)
    listed = {sh.name for sp in m.splits.values() for sh in sp.shards}
    assert {p.name for p in out.glob("*.tar")} == listed  # stale shards of the first build removed
    verify_shards(out)


def test_verify_detects_flipped_byte(digits_dir: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(digits_dir, d)
    name = read_manifest(d).splits["train"].shards[1].name
    data = bytearray((d / name).read_bytes())
    data[len(data) // 3] ^= 0x01
    (d / name).write_bytes(bytes(data))
    read_manifest(d)  # same size: the cheap check passes
    with pytest.raises(DataError, match=rf"shard .*{name} is corrupt: sha256"):
        verify_shards(d)


def test_read_manifest_errors(digits_dir: Path, tmp_path: Path) -> None:
    import shutil

    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no shards and no manifest.json"):
        read_manifest(tmp_path / "empty")

    d = tmp_path / "copy"
    shutil.copytree(digits_dir, d)
    good = (d / "manifest.json").read_text()
    (d / "manifest.json").write_text(good[: len(good) // 2])
    with pytest.raises(DataError, match="malformed .*manifest.json"):
        read_manifest(d)
    bad = json.loads(good)
    bad["num_classes"] = "ten"
    (d / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="malformed .*num_classes"):
        read_manifest(d)
    bad = json.loads(good)
    bad["surprise"] = 1
    (d / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="malformed .*surprise"):
        read_manifest(d)
    bad = json.loads(good)
    for split in bad["splits"].values():
        split["shards"], split["num_samples"], split["labels"] = [], 0, {}
    (d / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="lists no shards"):
        read_manifest(d)
    (d / "manifest.json").write_text(good)
    (d / "test-000000.tar").unlink()
    with pytest.raises(DataError, match="shard test-000000.tar listed in .* is missing"):
        read_manifest(d)
