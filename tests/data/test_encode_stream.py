"""The streaming `encode` stage: latent shards written by a Ray Data actor pool, checked against an
independent in-process encoding (every key once, the right arrays, the right scale)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import DataError, build_dataset, load_split, read_manifest, verify_shards, write_array_shard
from pipeline.data.local import iter_tar_samples
from pipeline.train.export import export_weights, load_exported
from tests.reliability.helpers import local_ray

ray = pytest.importorskip("ray")

AE_ARGS = {"in_channels": 1, "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "latent_channels": 2}


@pytest.fixture
def ray_local() -> Iterator[None]:
    """A small in-process Ray (4 CPUs) without token auth, per test (tests/conftest.py shuts Ray down after
    each; a module-wide one would leave later tests on an auto-started Ray of this machine's 2 CPUs, where a
    2-actor pool starves the read tasks); the environment is restored afterwards."""
    with local_ray(num_cpus=4):
        yield


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("enc") / "digits"
    build_dataset("digits", out, image_size=8, shard_size=300, seed=0)
    return out


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.models import build_model

    torch.manual_seed(0)
    return export_weights(build_model("kl_vae", **AE_ARGS).state_dict(), "kl_vae", AE_ARGS,
                          tmp_path_factory.mktemp("ae") / "export")


def _reference(model_dir: Path, data_dir: Path, split: str, limit: int | None = None) -> dict[str, np.ndarray]:
    """key -> unscaled latent mean, encoded here in one process (no Ray)."""
    model, _ = load_exported(model_dir)
    data = load_split(data_dir, split, limit=limit)
    with torch.no_grad():
        z = model.encode(torch.from_numpy(data["image"]))[0].numpy()
    return dict(zip(data["key"], z, strict=True))


def test_encode_streams_every_key_once_with_the_numpy_scale(ray_local: None, digits: Path, autoencoder: Path,
                                                            tmp_path: Path) -> None:
    from pipeline.stages.encode import SCALE_SAMPLES, encode_latents, encode_split

    out = tmp_path / "latents"
    out.mkdir()
    scale, manifest = encode_latents(digits, str(autoencoder), out, autoencoder="models:/ae/1", batch_size=64,
                                     shard_size=200, workers=2)
    source = read_manifest(digits)
    assert source.splits["train"].num_samples <= SCALE_SAMPLES  # so the scale covers the whole split
    ref = {split: _reference(autoencoder, digits, split) for split in ("train", "test")}
    expected = 1.0 / np.std(np.stack(list(ref["train"].values())).astype(np.float64))
    assert scale == pytest.approx(expected, rel=1e-6)
    assert json.loads((out / "scale.json").read_text()) == {"latent_scale": scale, "autoencoder": "models:/ae/1"}

    assert verify_shards(out) == manifest and manifest.encoding == "npy" and manifest.source == "latents:models:/ae/1"
    assert manifest.image_size == [4, 4, 2]  # (h, w, c) of the (2, 4, 4) latents
    for split in ("train", "test"):
        info = manifest.splits[split]
        names = [s.name for s in info.shards]
        assert names == sorted(names) and all(n.startswith(f"{split}-") for n in names)
        assert max(s.num_samples for s in info.shards) <= 200 and len(names) >= 2
        assert sorted(p.name for p in out.glob(f"{split}-*.tar")) == names  # nothing unlisted left behind
        got = load_split(out, split, limit=None)
        assert Counter(got["key"]) == Counter(list(ref[split]))  # each key once: no dropped or duplicated block
        assert len(got["key"]) == info.num_samples == source.splits[split].num_samples
        assert info.labels == source.splits[split].labels
        for key, z in zip(got["key"], got["image"], strict=True):
            np.testing.assert_allclose(z, ref[split][key] * expected, rtol=1e-5, atol=1e-5)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files

    again = tmp_path / "again"  # the same names and bytes on a second run
    again.mkdir()
    info, shape = encode_split(digits, str(autoencoder), again, "test", scale, batch_size=64, shard_size=200, workers=2)
    assert shape == (2, 4, 4) and info == manifest.splits["test"].model_dump()


def test_latents_written_into_a_bucket_read_back_through_the_cached_manifest(digits: Path, autoencoder: Path,
                                                                            tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """ray.latent_cache in a bucket (moto's S3 server): every actor uploads its shard, the driver writes scale.json
    and the manifest last; the readers reach the prefix through the manifest `open_dataset` caches here."""
    from pipeline.data.shards import open_dataset
    from pipeline.stages.encode import encode_latents, latent_info
    from tests.servers import s3_server

    with s3_server(tmp_path) as s3:
        for k, v in s3.env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # before Ray starts: its workers inherit it
        prefix = f"s3://{s3.bucket}/latents/ae-v1"
        with local_ray(num_cpus=4):
            scale, manifest = encode_latents(digits, str(autoencoder), prefix, autoencoder="models:/ae/1",
                                             batch_size=64, shard_size=200, workers=2)
        names = [sh.name for sp in manifest.splits.values() for sh in sp.shards]
        assert sorted(k.removeprefix("latents/ae-v1/") for k in s3.keys("latents/")) == sorted(
            [*names, "manifest.json", "scale.json"])
        cached = open_dataset(prefix, image_size=None, held_out=0.15, cache_dir=tmp_path / "cache")
        assert cached.parent == tmp_path / "cache"  # on this machine, not in the bucket
        assert read_manifest(cached).splits == manifest.splits and read_manifest(cached).root == prefix
        assert latent_info(cached) == {"latent_scale": scale, "autoencoder": "models:/ae/1"}
        ref = _reference(autoencoder, digits, "test")
        got = load_split(cached, "test")
        assert Counter(got["key"]) == Counter(list(ref))
        for key, z in zip(got["key"], got["image"], strict=True):
            np.testing.assert_allclose(z, ref[key] * scale, rtol=1e-5, atol=1e-5)


def test_scale_on_a_bounded_sample_is_the_first_training_samples(ray_local: None, digits: Path, autoencoder: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.stages.encode as encode

    monkeypatch.setattr(encode, "SCALE_SAMPLES", 333)  # crosses the 300-sample shard boundary
    scale = encode.latent_scale(digits, str(autoencoder), batch_size=50, workers=2)
    first = _reference(autoencoder, digits, "train", limit=333)
    assert scale == pytest.approx(1.0 / np.std(np.stack(list(first.values())).astype(np.float64)), rel=1e-6)
    whole = _reference(autoencoder, digits, "train")
    assert scale != pytest.approx(1.0 / np.std(np.stack(list(whole.values())).astype(np.float64)), rel=1e-6)


def test_write_array_shard_names_one_shard(tmp_path: Path) -> None:
    rows = [{"key": f"k-{i}", "array": np.full((2, 1, 1), i, np.float32), "label": i % 2, "caption": ""}
            for i in range(3)]
    shard, info = write_array_shard(rows, tmp_path, "test-k-0.tar")
    assert shard.name == "test-k-0.tar" and shard.num_samples == 3 and info.labels == {0: 2, 1: 1}
    assert [s["__key__"] for s in iter_tar_samples(tmp_path / "test-k-0.tar")] == ["k-0", "k-1", "k-2"]
    assert shard.bytes == (tmp_path / "test-k-0.tar").stat().st_size
    for bad in ("nodash.tar", "test-a.b.tar", "test/x-0.tar", "test-k-0"):
        with pytest.raises(DataError, match="shard name"):
            write_array_shard(rows, tmp_path, bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test-k-0.tar"]
