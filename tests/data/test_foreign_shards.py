"""Shards written elsewhere (img2dataset's layout: jpg|png|webp + txt + json, no manifest), locally and in a bucket.

The expected pixels are computed here with PIL from the bytes written (resize the shorter side, bicubic, then
crop), never through the pipeline's own helpers.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import DataError, load_split, read_manifest
from pipeline.data.shards import count_shards, open_dataset
from pipeline.data.stream import plain_batches, spec_for

#: (height, width) of the images, in turn: landscape, portrait, square, very wide, odd sizes, smaller than S
SIZES = [(30, 40), (56, 24), (33, 33), (20, 64), (29, 17), (12, 10)]
S = 16


def _image(h: int, w: int, seed: int) -> Image.Image:
    """A smooth RGB picture with some noise (so crops at different offsets differ)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) * 127 // max(1, h + w - 2)], -1)
    arr = np.clip(arr + rng.integers(-20, 21, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _encode(im: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext == "jpg":
        im.save(buf, format="JPEG", quality=90)
    elif ext == "webp":
        im.save(buf, format="WEBP", lossless=True)
    else:
        im.save(buf, format="PNG")
    return buf.getvalue()


def write_img2dataset(out: Path, counts: tuple[int, ...] = (4, 5, 3), *, ext: str = "jpg", labels: bool = False,
                      pickled: str | None = None) -> dict[str, bytes]:
    """img2dataset-style shards ``00000.tar ...`` in ``out``: ``<key>.<ext>``, ``.txt``, ``.json`` (and ``.cls``
    with ``labels``; a ``.pyd`` pickle that would create directory ``pickled`` if it were ever unpickled), plus the
    ``_stats.json`` and ``.parquet`` files img2dataset leaves beside them, and no manifest. Returns key -> image
    bytes."""
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, bytes] = {}
    n = 0
    for shard, count in enumerate(counts):
        with tarfile.open(out / f"{shard:05d}.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            for _ in range(count):
                key = f"{shard:05d}{n:04d}"
                h, w = SIZES[n % len(SIZES)]
                images[key] = _encode(_image(h, w, n), ext)
                members = {ext: images[key], "txt": f"a picture number {n}".encode(),
                           "json": json.dumps({"url": f"http://example.com/{n}.jpg", "width": w}).encode()}
                if labels:
                    members["cls"] = str(n % 3).encode()
                if pickled:
                    from tests.data.datatest_helpers import MakesDir

                    members["pyd"] = pickle.dumps(MakesDir(pickled))
                for e, data in members.items():
                    ti = tarfile.TarInfo(f"{key}.{e}")
                    ti.size = len(data)
                    tar.addfile(ti, io.BytesIO(data))
                n += 1
        (out / f"{shard:05d}_stats.json").write_text(json.dumps({"count": count, "successes": count}))
        (out / f"{shard:05d}.parquet").write_bytes(b"PAR1 not really")
    return images


def expected_pixels(data: bytes, size: int = S, offset: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 (3, size, size): RGB, shorter side resized to `size` (bicubic), cropped at the center or `offset`."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = offset if offset is not None else ((nh - size) // 2, (nw - size) // 2)
    return np.asarray(im.crop((left, top, left + size, top + size))).transpose(2, 0, 1)


def resized(data: bytes, size: int = S) -> np.ndarray:
    """uint8 (3, H', W'): the whole image with its shorter side resized to `size`."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    nw, nh = max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h)))
    return np.asarray(im.resize((nw, nh), Image.Resampling.BICUBIC)).transpose(2, 0, 1)


def listing(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*")}


def to_u8(images: np.ndarray) -> np.ndarray:
    """load_split's float [-1, 1] back to the uint8 it came from."""
    return np.rint((images + 1.0) * 127.5).astype(np.uint8)


# ----------------------------------------------------------------------------- counting, split, cache


def test_counted_manifest_split_and_cache_are_beside_the_run_not_the_data(tmp_path: Path) -> None:
    data, cache = tmp_path / "data", tmp_path / "run" / ".pipeline" / "manifests"
    write_img2dataset(data, (4, 5, 3, 2))
    before = listing(data)
    path = open_dataset(str(data), image_size=S, held_out=0.3, cache_dir=cache)
    assert path.parent == cache.resolve() and len(path.stem) == 64 and path.suffix == ".json"
    assert listing(data) == before  # nothing written beside the shards
    m = read_manifest(path)
    n_test = math.ceil(0.3 * 4)  # the last 2 shards by name
    assert [s.name for s in m.splits["train"].shards] == ["00000.tar", "00001.tar"]
    assert [s.name for s in m.splits["test"].shards] == ["00002.tar", "00003.tar"] and n_test == 2
    assert [s.num_samples for s in m.splits["train"].shards] == [4, 5] and m.splits["test"].num_samples == 5
    assert [s.bytes for s in m.splits["train"].shards] == [(data / n).stat().st_size for n in ("00000.tar",
                                                                                            "00001.tar")]
    assert m.image_size == [S, S, 3] and m.num_classes == 1 and m.splits["train"].labels == {0: 9}
    assert m.root == str(data.resolve()) and m.resize
    # the same shards: the same file, not recounted (its bytes and time unchanged)
    stamp = path.stat().st_mtime_ns
    assert open_dataset(str(data), image_size=S, held_out=0.3, cache_dir=cache) == path
    assert path.stat().st_mtime_ns == stamp
    # a changed shard set is counted again, under another name
    write_img2dataset(tmp_path / "more", (1, 1, 1, 1, 6))
    (tmp_path / "more" / "00004.tar").rename(data / "00004.tar")
    again = open_dataset(str(data), image_size=S, held_out=0.3, cache_dir=cache)
    assert again != path and read_manifest(again).splits["test"].num_samples == 2 + 6  # ceil(1.5) = 2 shards


def test_cls_members_give_labels_and_their_count(tmp_path: Path) -> None:
    write_img2dataset(tmp_path / "d", (4, 5, 3), labels=True)
    m = count_shards(str(tmp_path / "d"), image_size=S, held_out=0.1)
    assert m.num_classes == 3
    assert m.splits["train"].labels == {0: 3, 1: 3, 2: 3} and m.splits["test"].labels == {0: 1, 1: 1, 2: 1}
    got = load_split(open_dataset(str(tmp_path / "d"), image_size=S, held_out=0.1, cache_dir=tmp_path / "c"),
                     "train", limit=None)
    assert got["label"].tolist() == [i % 3 for i in range(9)]


def test_missing_image_size_one_shard_and_no_shards_say_what_to_do(tmp_path: Path) -> None:
    from pipeline.config import SpecError, parse_spec

    write_img2dataset(tmp_path / "d")
    with pytest.raises(DataError, match=r"without a manifest.json: set data.image_size"):
        open_dataset(str(tmp_path / "d"), image_size=None, held_out=0.2, cache_dir=tmp_path / "c")
    job = {"name": "x", "data": {"source": "shards", "dir": str(tmp_path / "d")}, "eval": {"classifier": None},
           "stages": {"c": {"kind": "classifier", "model": {"name": "classifier"}, "train": {"steps": 1},
                            "register": {"name": "c", "gate": {"metric": "eval/accuracy", "min": 0}}}}}
    with pytest.raises(SpecError, match=r"to train on shards written elsewhere \(e.g. by img2dataset\), set "
                                        r"data.image_size"):
        parse_spec(job)
    job["data"]["image_size"] = S
    assert parse_spec(job).data.crop == "center"
    write_img2dataset(tmp_path / "one", (3,))
    with pytest.raises(DataError, match=r"holds only one shard \(00000.tar\).*at least 2 are needed"):
        open_dataset(str(tmp_path / "one"), image_size=S, held_out=0.2, cache_dir=tmp_path / "c")
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="holds no shards and no manifest.json"):
        open_dataset(str(tmp_path / "none"), image_size=S, held_out=0.2, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


# ----------------------------------------------------------------------------- pixels


def test_held_out_reads_are_center_crops_of_the_resized_images(tmp_path: Path) -> None:
    images = write_img2dataset(tmp_path / "d")
    ds = open_dataset(str(tmp_path / "d"), image_size=S, held_out=0.2, cache_dir=tmp_path / "c")
    for split in ("train", "test"):
        got = load_split(ds, split, limit=None)
        assert got["image"].shape[1:] == (3, S, S) and got["image"].dtype == np.float32
        assert got["caption"][0].startswith("a picture number") and "url" in got["extra"][0]
        for key, image in zip(got["key"], got["image"], strict=True):
            np.testing.assert_array_equal(to_u8(image), expected_pixels(images[key]))
    assert sorted(load_split(ds, "test", limit=None)["key"]) == sorted(k for k in images if k.startswith("00002"))


def _epochs(spec, n: int, epochs: int) -> list[dict[str, np.ndarray]]:
    """key -> uint8 image of each of the first `epochs` epochs (one batch of all `n` training samples each)."""
    out = []
    for _, (_, batch) in zip(range(epochs), plain_batches(spec, micro=n), strict=False):
        assert set(batch["epoch"].tolist()) == {len(out)}
        out.append(dict(zip(batch["key"], batch["image"], strict=True)))
    return out


def test_training_crops_center_or_random_from_seed_epoch_and_key(tmp_path: Path) -> None:
    images = write_img2dataset(tmp_path / "d")
    ds = str(open_dataset(str(tmp_path / "d"), image_size=S, held_out=0.2, cache_dir=tmp_path / "c"))
    center = _epochs(spec_for(ds, "train", seed=3), 9, 2)
    for epoch in center:
        assert len(epoch) == 9
        for key, image in epoch.items():
            np.testing.assert_array_equal(image, expected_pixels(images[key]))
    random = _epochs(spec_for(ds, "train", seed=3, crop="random"), 9, 3)
    assert [set(e) for e in random] == [set(center[0])] * 3
    again = _epochs(spec_for(ds, "train", seed=3, crop="random"), 9, 2)
    other_seed = _epochs(spec_for(ds, "train", seed=4, crop="random"), 9, 1)
    moved = 0
    for key, data in images.items():
        if key not in random[0]:
            continue
        whole = resized(data)
        _, h, w = whole.shape
        offsets = []
        for epoch in random:
            windows = [(y, x) for y in range(h - S + 1) for x in range(w - S + 1)
                       if np.array_equal(epoch[key], whole[:, y:y + S, x:x + S])]
            assert windows, f"{key}: the random crop is not a window of the resized image"
            offsets.append(windows[0])
        np.testing.assert_array_equal(again[0][key], random[0][key])  # reproducible
        np.testing.assert_array_equal(again[1][key], random[1][key])
        if (h, w) != (S, S):
            moved += len(set(offsets)) > 1 or not np.array_equal(other_seed[0][key], random[0][key])
    slack = sum(1 for k in random[0] if resized(images[k]).shape[1:] != (S, S))
    assert slack >= 6 and moved >= slack - 1  # fresh each epoch (a rare repeat allowed)


def test_webp_and_png_members_decode(tmp_path: Path) -> None:
    for ext in ("webp", "png"):
        images = write_img2dataset(tmp_path / ext, (2, 2), ext=ext)
        got = load_split(open_dataset(str(tmp_path / ext), image_size=S, held_out=0.5, cache_dir=tmp_path / "c"),
                         "train", limit=None)
        assert len(got["key"]) == 2
        for key, image in zip(got["key"], got["image"], strict=True):
            np.testing.assert_array_equal(to_u8(image), expected_pixels(images[key]))


def test_pickled_members_are_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    write_img2dataset(tmp_path / "d", pickled=str(marker))
    ds = open_dataset(str(tmp_path / "d"), image_size=S, held_out=0.2, cache_dir=tmp_path / "c")
    assert len(load_split(ds, "test", limit=None)["key"]) == 3
    _epochs(spec_for(str(ds), "train", seed=0, crop="random"), 9, 1)
    assert not marker.exists()
    with tarfile.open(tmp_path / "d" / "00000.tar") as tar:  # the member is live: unpickling it makes the marker
        f = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".pyd")))
        assert f is not None
        pickle.loads(f.read())  # noqa: S301 - the test's own pickle
    assert marker.is_dir()


def test_our_shards_read_as_before_unless_resized(tmp_path: Path, digits_dir: Path) -> None:
    assert open_dataset(str(digits_dir), image_size=8, held_out=0.15, cache_dir=tmp_path / "c") == digits_dir
    assert open_dataset(str(digits_dir), image_size=None, held_out=0.15, cache_dir=tmp_path / "c") == digits_dir
    assert not (tmp_path / "c").exists()
    bigger = open_dataset(str(digits_dir), image_size=12, held_out=0.15, cache_dir=tmp_path / "c")
    m = read_manifest(bigger)
    assert m.image_size == [12, 12, 1] and m.resize and m.num_classes == 10 and m.source == "digits"
    got = load_split(bigger, "test", limit=5)
    src = load_split(digits_dir, "test", limit=5)
    assert got["key"] == src["key"] and got["image"].shape == (5, 1, 12, 12)
    for small, big in zip(src["image"], got["image"], strict=True):
        want = Image.fromarray(to_u8(small)[0], "L").resize((12, 12), Image.Resampling.BICUBIC)
        np.testing.assert_array_equal(to_u8(big)[0], np.asarray(want))


# ----------------------------------------------------------------------------- in a bucket (moto's S3 server)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory):
    from tests.servers import s3_server

    with s3_server(tmp_path_factory.mktemp("s3")) as s3:
        yield s3


def upload(s3, local: Path, prefix: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=s3.env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    for p in sorted(local.iterdir()):
        client.upload_file(str(p), s3.bucket, f"{prefix}/{p.name}")


@pytest.fixture
def s3_env(bucket, monkeypatch: pytest.MonkeyPatch):
    for k, v in bucket.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", bucket.endpoint)  # pyarrow's S3 filesystem honours it
    return bucket


def test_shards_in_a_bucket_read_as_the_same_shards_on_disk(tmp_path: Path, s3_env) -> None:
    s3 = s3_env
    local = tmp_path / "d"
    images = write_img2dataset(local, (4, 5, 3), pickled=str(tmp_path / "unpickled"))
    upload(s3, local, "foreign")
    before = sorted(s3.keys("foreign/"))
    uri = f"s3://{s3.bucket}/foreign"
    remote = open_dataset(uri, image_size=S, held_out=0.2, cache_dir=tmp_path / "c")
    ondisk = open_dataset(str(local), image_size=S, held_out=0.2, cache_dir=tmp_path / "c")
    assert remote.parent == (tmp_path / "c").resolve() and remote != ondisk
    m, want = read_manifest(remote), read_manifest(ondisk)
    assert m.root == uri and m.splits == want.splits and m.num_classes == want.num_classes
    assert sorted(s3.keys("foreign/")) == before  # nothing written into the bucket
    got = load_split(remote, "test", limit=None)
    assert got["key"] == load_split(ondisk, "test", limit=None)["key"]
    for key, image in zip(got["key"], got["image"], strict=True):
        np.testing.assert_array_equal(to_u8(image), expected_pixels(images[key]))
    a = _epochs(spec_for(str(remote), "train", seed=1, crop="random"), 9, 2)
    b = _epochs(spec_for(str(ondisk), "train", seed=1, crop="random"), 9, 2)
    for ea, eb in zip(a, b, strict=True):
        assert ea.keys() == eb.keys() and all(np.array_equal(ea[k], eb[k]) for k in ea)
    assert not (tmp_path / "unpickled").exists()


def test_a_bucket_shard_is_scanned_once_per_node(tmp_path: Path, s3_env, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.data import stream

    s3 = s3_env
    write_img2dataset(tmp_path / "a", (4,))
    upload(s3, tmp_path / "a", "indexed")
    uri = f"s3://{s3.bucket}/indexed/00000.tar"
    monkeypatch.setattr(stream, "INDEX_CACHE", str(tmp_path / "index"))
    stream.shard_index.cache_clear()
    first = stream.shard_index(uri, 4)
    assert first == stream.scan_index(str(tmp_path / "a" / "00000.tar"))  # the offsets of the same tar on disk
    assert len(list((tmp_path / "index").glob("*.json"))) == 1

    def scanned(*_: object) -> None:
        raise AssertionError("scanned again")

    monkeypatch.setattr(stream, "scan_index", scanned)
    stream.shard_index.cache_clear()  # another process of this node: no scan, the same index
    assert stream.shard_index(uri, 4) == first
    write_img2dataset(tmp_path / "b", (5,))  # the shard replaced by another: scanned again
    upload(s3, tmp_path / "b", "indexed")
    stream.shard_index.cache_clear()
    with pytest.raises(AssertionError, match="scanned again"):
        stream.shard_index(uri, 5)
    stream.shard_index.cache_clear()


def test_our_manifest_in_a_bucket_with_the_endpoint_in_the_uri(tmp_path: Path, bucket, digits_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.data.stream import read_samples

    for k, v in bucket.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    upload(bucket, digits_dir, "digits")
    uri = f"s3://{bucket.bucket}/digits?endpoint_override={bucket.endpoint.removeprefix('http://')}&scheme=http"
    assert read_manifest(uri) == read_manifest(digits_dir)
    ds = open_dataset(uri, image_size=None, held_out=0.15, cache_dir=tmp_path / "c")
    assert ds.parent == (tmp_path / "c").resolve() and read_manifest(ds).root == uri
    got, want = load_split(ds, "test", limit=50), load_split(digits_dir, "test", limit=50)
    assert got["key"] == want["key"] and np.array_equal(got["image"], want["image"])
    spec = spec_for(str(ds), "train", seed=0)
    assert spec.paths[0].startswith(f"s3://{bucket.bucket}/digits/train-") and spec.paths[0].endswith("&scheme=http")
    ids = np.array([0, 299, 300, 7])  # across a shard boundary, out of order
    local = spec_for(str(digits_dir), "train", seed=0)
    for r, w in zip(read_samples(spec, ids), read_samples(local, ids), strict=True):
        assert r["__key__"] == w["__key__"] and r["png"] == w["png"] and r["cls"] == w["cls"]


def test_the_ray_data_path_reads_the_bucket_with_center_crops(tmp_path: Path, s3_env,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`ray_dataset` (what encode stages read) through the bucket's filesystem, its endpoint given in the URI only:
    every held-out image, resized and center-cropped in Ray Data tasks."""
    from pipeline.data.ray_data import ray_dataset
    from tests.reliability.helpers import local_ray

    images = write_img2dataset(tmp_path / "d", (2, 3, 2), ext="png")
    upload(s3_env, tmp_path / "d", "for-ray")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    uri = f"s3://{s3_env.bucket}/for-ray?endpoint_override={s3_env.endpoint.removeprefix('http://')}&scheme=http"
    ds = open_dataset(uri, image_size=S, held_out=0.4, cache_dir=tmp_path / "c")
    with local_ray(num_cpus=2):
        rows = ray_dataset(ds, "test").take_all()
    assert sorted(r["key"] for r in rows) == sorted(k for k in images if k[:5] in ("00001", "00002"))
    for r in rows:
        assert r["label"] == 0
        np.testing.assert_array_equal(to_u8(r["image"]), expected_pixels(images[r["key"]]))


def test_a_missing_or_empty_bucket_prefix_is_a_clear_error(tmp_path: Path, s3_env) -> None:
    from pipeline.data.storage import display

    assert display("s3://KEY:SECRET@bucket/p?endpoint_override=h:1") == "s3://bucket/p"
    with pytest.raises(DataError, match=rf"data.dir s3://{s3_env.bucket}/nothing-here does not exist"):
        open_dataset(f"s3://{s3_env.bucket}/nothing-here", image_size=S, held_out=0.2, cache_dir=tmp_path / "c")
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "00000_stats.json").write_text("{}")
    upload(s3_env, tmp_path / "stats", "no-tars")
    with pytest.raises(DataError, match=rf"s3://{s3_env.bucket}/no-tars holds no shards"):
        open_dataset(f"s3://{s3_env.bucket}/no-tars", image_size=S, held_out=0.2, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(f"s3://{s3_env.bucket}/nothing-here")


# ----------------------------------------------------------------------------- end to end: `pipeline run`

AE_JOB = {
    "name": "foreign", "seed": 0,
    "data": {"source": "shards", "dir": "SET-ME", "image_size": S, "crop": "random", "held_out": 0.25},
    "tracking": {"experiment": "foreign"},
    "eval": {"classifier": None},
    "ray": {"num_cpus": 4},
    "stages": {
        "autoencoder": {
            "kind": "autoencoder",
            "model": {"name": "kl_vae", "args": {"in_channels": 3, "base_channels": 8, "channel_mult": [1, 2],
                                                 "num_res_blocks": 1, "latent_channels": 2}},
            "objective": {"beta": 1.0e-5},
            "scale": {"workers": 1, "max_failures": 0},
            "train": {"steps": 4, "batch_size": 8, "checkpoint_every": 2, "log_every": 1},
            "register": {"name": "foreign-ae", "gate": {"metric": "eval/recon_mse", "max": 10.0}},
        },
    },
}


def _run(tmp_path: Path, data: str, storage: str, env: dict[str, str], tracking_uri: str | None = None):
    import yaml

    from tests.reliability.helpers import run_log, run_pipeline

    job = json.loads(json.dumps(AE_JOB))
    job["data"]["dir"], job["ray"]["storage"], job["tracking"]["uri"] = data, storage, tracking_uri
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "job.yaml").write_text(yaml.safe_dump(job))
    r = run_pipeline(cwd, "run", "job.yaml", timeout=900, env=env)
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-4000:]}\n{run_log(cwd)[-4000:]}"
    cached = list((cwd / ".pipeline" / "manifests").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["root"] == data
    return cwd


def _version(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    [version] = client.search_model_versions("name='foreign-ae'")
    run = client.get_run(version.run_id)
    sources = [json.loads(d.dataset.source)["uri"] for d in run.inputs.dataset_inputs]
    return version, run, sources


@pytest.mark.slow
def test_pipeline_run_trains_an_autoencoder_on_img2dataset_shards(tmp_path: Path) -> None:
    from tests.reliability.helpers import clean_env

    data = tmp_path / "shards"
    write_img2dataset(data, (6, 6, 6, 6))
    before = listing(data)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cwd = _run(tmp_path, str(data), str(tmp_path / "ray"), clean_env(), tracking_uri=uri)
    assert listing(data) == before
    version, run, sources = _version(uri)
    assert sources == [str(data), str(data)] and run.data.metrics["eval/recon_mse"] < 10.0
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"webdataset:train", "webdataset:test"}
    assert any((tmp_path / "ray").rglob("checkpoint_*")), "Ray Train kept no checkpoint"
    assert not (cwd / "data").exists()


@pytest.mark.slow
def test_pipeline_run_reads_a_bucket_and_keeps_checkpoints_and_models_in_it(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.reliability.helpers import clean_env
    from tests.servers import mlflow_server

    with mlflow_server(tmp_path / "srv", artifacts="s3") as srv:
        s3 = srv.s3
        assert s3 is not None
        write_img2dataset(tmp_path / "shards", (6, 6, 6, 6))
        upload(s3, tmp_path / "shards", "data/foreign")
        before = sorted(s3.keys("data/"))
        env = clean_env(**srv.env, **s3.env, AWS_ENDPOINT_URL=s3.endpoint)
        data = f"s3://{s3.bucket}/data/foreign"
        _run(tmp_path, data, f"s3://{s3.bucket}/ray", env)
        assert sorted(s3.keys("data/")) == before  # nothing written beside the shards
        ray_keys = s3.keys("ray/")
        assert any("/checkpoint_" in k for k in ray_keys), ray_keys[:20]
        for k, v in srv.env.items():
            monkeypatch.setenv(k, v)
        version, run, sources = _version(srv.uri)
        assert sources == [data, data]
        model_id = version.source.removeprefix("models:/")
        assert any(model_id in k and k.endswith("model.safetensors") for k in s3.keys("mlflow/"))
