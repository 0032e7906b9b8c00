"""The Ray Data path yields what the local iterator yields, and decodes just as safely."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import DataError, iterate_batches, read_manifest
from pipeline.data.local import iter_tar_samples
from tests.data.datatest_helpers import MakesDir, refresh_manifest, write_raw_tar
from tests.reliability.helpers import ray_auth_disabled

ray = pytest.importorskip("ray")

_ENV = ("RAY_AUTH_MODE",)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """One small in-process Ray instance for this module.

    Ray 2.60 turns token auth on by default, writes ~/.ray/auth_token and sets
    RAY_AUTH_MODE=token in this process's environment. This throwaway local instance
    runs with auth disabled instead (nothing written to ~/.ray) and the environment is
    restored afterwards, so later tests see the environment they started with.
    """
    saved = {k: os.environ.get(k) for k in _ENV}
    ray_auth_disabled()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _signature(labels: np.ndarray, images: np.ndarray) -> Counter:
    sums = np.rint((images.reshape(len(images), -1) + 1) * 127.5).sum(axis=1).astype(np.int64)
    return Counter(zip(labels.tolist(), sums.tolist(), strict=True))


def _with_poison(digits_dir: Path, tmp_path: Path) -> tuple[Path, str, Path]:
    """Copy of the dataset whose test shard gains .pyd/.pth members (side effect if unpickled)
    and one corrupt PNG."""
    d = tmp_path / "ds"
    shutil.copytree(digits_dir, d)
    marker = tmp_path / "pwned"
    import pickle

    payload = pickle.dumps(MakesDir(str(marker)))
    name = read_manifest(d).splits["test"].shards[0].name
    samples = [{k: v for k, v in s.items() if k != "__url__"} for s in iter_tar_samples(d / name)]
    for s in samples[:10]:
        s["pyd"] = payload
        s["pth"] = payload
    samples[3]["png"] = b"not a png"
    write_raw_tar(d / name, samples)
    refresh_manifest(d, name)
    return d, samples[3]["__key__"], marker


def test_ray_matches_local_and_is_safe(ray_local: None, digits_dir: Path, tmp_path: Path) -> None:
    from pipeline.data.ray_data import ray_dataset, torch_batches

    rows = ray_dataset(digits_dir, "train", shuffle_seed=1).take_all()
    images = np.stack([r["image"] for r in rows])
    labels = np.array([r["label"] for r in rows])
    assert images.dtype == np.float32 and images.shape[1:] == (1, 8, 8) and labels.dtype == np.int64
    assert isinstance(rows[0]["caption"], str)
    local = [b for b in iterate_batches(digits_dir, "train", 97, epochs=1, drop_last=False, seed=3)]
    local_images = np.concatenate([b["image"].numpy() for b in local])
    local_labels = np.concatenate([b["label"].numpy() for b in local])
    assert _signature(labels, images) == _signature(local_labels, local_images)
    assert sorted(r["key"] for r in rows) == sorted(k for b in local for k in b["key"])

    # torch batches in the local iterator's format
    batches = list(torch_batches(ray_dataset(digits_dir, "test"), 50, drop_last=False))
    ref = next(iterate_batches(digits_dir, "test", 50, epochs=1))
    b = batches[0]
    assert (
        set(b) == set(ref)
        and b["image"].dtype == ref["image"].dtype
        and b["label"].dtype == ref["label"].dtype
    )
    assert (
        b["image"].shape == ref["image"].shape
        and isinstance(b["caption"], list)
        and type(b["caption"][0]) is str
    )
    assert sum(len(b["key"]) for b in batches) == read_manifest(digits_dir).splits["test"].num_samples

    d, bad_key, marker = _with_poison(digits_dir, tmp_path)
    n_test = read_manifest(d).splits["test"].num_samples
    # Ray wraps the task's DataError (RayTaskError(UserCodeException)); the message and cause chain keep it
    with pytest.raises(
        Exception, match=rf"DataError: corrupt member {bad_key}\.png in shard .*test-000000\.tar"
    ):
        ray_dataset(d, "test").take_all()
    kept = ray_dataset(d, "test", on_corrupt="skip").take_all()
    assert len(kept) == n_test - 1 and bad_key not in {r["key"] for r in kept}
    assert set(kept[0]) == {"image", "label", "caption", "key"}
    assert not marker.exists()


def test_ray_dataset_checks_before_running(tmp_path: Path) -> None:
    from pipeline.data.ray_data import ray_dataset

    with pytest.raises(DataError, match="does not exist"):
        ray_dataset(tmp_path / "nope", "train")
    with pytest.raises(ValueError, match="on_corrupt"):
        ray_dataset(tmp_path, "train", on_corrupt="maybe")  # type: ignore[arg-type]
