"""The training read order (`pipeline.data.stream`): exactly once per epoch, the same global batches for any
worker count, resumable at any batch, fresh augmentation per epoch, bytes equal to a plain tar read."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import build_dataset, load_split
from pipeline.data.decode import to_unit_range
from pipeline.data.errors import DataError
from pipeline.data.stream import (
    augment_sample,
    batch_ids,
    epoch_order,
    plain_batches,
    read_batches,
    read_samples,
    shard_index,
    spec_for,
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("stream") / "digits"
    build_dataset("digits", d, image_size=8, shard_size=200, seed=0)  # 8 train shards, the last one short
    return d


def test_every_epoch_is_a_permutation_and_epochs_differ(digits: Path) -> None:
    spec = spec_for(str(digits), "train", seed=3, window=3)
    a, b = epoch_order(spec, 0), epoch_order(spec, 1)
    assert sorted(a.tolist()) == list(range(spec.size)) == sorted(b.tolist())
    assert not np.array_equal(a, b)
    assert np.array_equal(a, epoch_order(dataclasses.replace(spec), 0))  # a function of (spec, epoch) only
    assert not np.array_equal(a, epoch_order(dataclasses.replace(spec, seed=4), 0))


def test_a_window_mixes_only_its_own_shards(digits: Path) -> None:
    spec = spec_for(str(digits), "train", seed=0, window=2)
    starts = np.cumsum((0, *spec.counts))
    shard_of = np.searchsorted(starts, epoch_order(spec, 0), side="right") - 1
    i, windows = 0, 0
    while i < len(shard_of):  # the epoch cuts into runs of two whole shards (the last may be one)
        a = int(shard_of[i])
        rest = shard_of[i:][shard_of[i:] != a]
        pair = {a} if a not in shard_of[i + spec.counts[a]:] and not len(rest) else {a, int(rest[0])}
        n = sum(spec.counts[s] for s in pair)
        assert set(shard_of[i:i + n].tolist()) == pair
        assert len(set(shard_of[i:i + 20].tolist())) == len(pair)  # interleaved, not one after the other
        i, windows = i + n, windows + 1
    assert windows == 4  # 8 shards


@pytest.mark.parametrize("world,micro", [(1, 48), (2, 24), (3, 16)])
def test_an_epoch_is_read_exactly_once_across_workers(digits: Path, world: int, micro: int) -> None:
    spec = spec_for(str(digits), "train", seed=0)
    n, g = spec.size, world * micro
    seen: list[int] = []
    for b in range(-(-n // g) + 1):  # one batch past the epoch's end
        for r in range(world):
            epochs, ids = batch_ids(spec, b, rank=r, world=world, micro=micro)
            seen += ids[epochs == 0].tolist()
    assert sorted(seen) == list(range(n))


def test_global_batches_do_not_depend_on_the_worker_count(digits: Path) -> None:
    spec = spec_for(str(digits), "train", seed=1)
    for b in (0, 7, 31, 32, 33):  # 32 batches of 48 per epoch of 1,527: 31 straddles the epoch boundary
        one = batch_ids(spec, b, rank=0, world=1, micro=48)[1]
        three = np.concatenate([batch_ids(spec, b, rank=r, world=3, micro=16)[1] for r in range(3)])
        assert np.array_equal(one, three)


def test_resuming_at_a_batch_reads_what_an_uninterrupted_stream_reads(digits: Path) -> None:
    spec = spec_for(str(digits), "train", seed=0, shift=1, hflip=True)
    whole = plain_batches(spec, micro=32)
    ref = [next(whole) for _ in range(50)]  # past the first epoch
    resumed = plain_batches(spec, micro=32, start=45)
    for b, batch in ref[45:]:
        rb, got = next(resumed)
        assert rb == b
        assert list(got["key"]) == list(batch["key"]) and np.array_equal(got["image"], batch["image"])


def test_samples_are_the_shards_bytes(digits: Path) -> None:
    spec = spec_for(str(digits), "train", seed=0)
    ref = load_split(digits, "train")
    index = {k: i for i, k in enumerate(ref["key"])}
    batch = read_batches(spec, np.arange(3), rank=1, world=2, micro=20)
    assert batch["image"].dtype == np.uint8 and batch["ok"].all()
    assert list(batch["batch"]) == [0] * 20 + [1] * 20 + [2] * 20
    for img, key, label in zip(batch["image"], batch["key"], batch["label"], strict=True):
        assert np.array_equal(to_unit_range(img), ref["image"][index[key]]) and label == ref["label"][index[key]]
    assert sum(len(shard_index(p).keys) for p in spec.paths) == spec.size


def test_augmentation_is_fresh_every_epoch_and_reproducible() -> None:
    img = np.zeros((1, 8, 8), np.uint8)
    img[0, 2:4, 2:4] = 255
    draws = [augment_sample(img, seed=0, epoch=e, key="k7", hflip=True, shift=2) for e in range(12)]
    assert all(int(d.sum()) == 4 * 255 for d in draws)  # moved (and maybe flipped), never cut: shift <= 2
    assert len({d.tobytes() for d in draws}) > 3  # differs between epochs
    again = augment_sample(img, seed=0, epoch=5, key="k7", hflip=True, shift=2)
    assert np.array_equal(again, draws[5])  # a function of (seed, epoch, key)
    others = {augment_sample(img, seed=0, epoch=5, key=f"k{i}", hflip=True, shift=2).tobytes() for i in range(20)}
    assert len(others) > 3  # and differs between samples of one epoch
    assert augment_sample(img, seed=0, epoch=0, key="k", hflip=False, shift=0) is img


def test_latents_are_never_augmented(tmp_path: Path) -> None:
    from pipeline.data import write_array_shards, write_manifest
    from pipeline.data.shards import Manifest

    rows = [{"key": f"s{i:03d}", "array": np.full((2, 3, 3), float(i), np.float32), "label": i % 2, "caption": ""}
            for i in range(10)]
    infos = write_array_shards(rows, tmp_path, prefix="train", shard_size=4)
    write_manifest(tmp_path, Manifest(source="t", encoding="npy", image_size=[3, 3, 2], num_classes=2,
                                      splits={"train": {"num_samples": 10, "labels": {0: 5, 1: 5}, "shards": infos}}))
    spec = spec_for(str(tmp_path), "train", seed=0, shift=1, hflip=True)
    assert (spec.shift, spec.hflip) == (0, False)
    batch = read_batches(spec, np.arange(2), rank=0, world=1, micro=5)
    assert batch["image"].dtype == np.float32
    for img, key in zip(batch["image"], batch["key"], strict=True):
        assert np.all(img == float(int(key[1:])))


def test_a_shard_that_disagrees_with_its_manifest_is_refused(digits: Path) -> None:
    spec = spec_for(str(digits), "train", seed=0)
    wrong = dataclasses.replace(spec, counts=(spec.counts[0] + 1, *spec.counts[1:]))
    with pytest.raises(DataError, match="holds 200 samples, its manifest says 201"):
        read_samples(wrong, np.array([0]))  # sample 0 lies in shard 0
