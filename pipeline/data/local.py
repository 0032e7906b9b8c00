"""Reading shards in one plain process, without Ray: tests, benchmarks, single-process training."""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import storage
from pipeline.data.decode import OnCorrupt, check_decoded, check_on_corrupt, decode_fitted, decode_sample
from pipeline.data.errors import DataError
from pipeline.data.shards import expected_chw, read_manifest, shard_paths

log = logging.getLogger(__name__)


@dataclass
class ReadStats:
    """Counts kept by the readers; ``skipped`` lists corrupt samples skipped in skip mode."""

    samples: int = 0
    skipped: int = 0
    skipped_keys: list[str] = field(default_factory=list)


def iter_tar_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar: ``{"__key__", "__url__", ext: bytes, ...}``, grouped by key.

    The key is a member's name up to its first dot; a sample's members must be contiguous. ``path`` may be a
    URI (one sequential read).
    """
    url = str(path)
    current: dict[str, Any] | None = None
    seen: set[str] = set()
    remote = storage.open_stream(url) if storage.is_uri(url) else None
    try:
        with tarfile.open(url if remote is None else None, mode="r|", fileobj=remote) as tar:
            for ti in tar:
                if not ti.isreg():
                    continue
                key, dot, ext = ti.name.partition(".")
                if not dot:
                    continue
                if current is None or key != current["__key__"]:
                    if current is not None:
                        seen.add(current["__key__"])
                        yield current
                    if key in seen:
                        raise DataError(f"shard {url}: members of sample {key} are not contiguous")
                    current = {"__key__": key, "__url__": url}
                f = tar.extractfile(ti)
                assert f is not None
                current[ext] = f.read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(
            f"shard {storage.display(url)} is unreadable ({type(e).__name__}: {e}); verify or rebuild the dataset"
        ) from e
    finally:
        if remote is not None:
            remote.close()
    if current is not None:
        yield current


def iter_samples(
    paths: list[str],
    *,
    on_corrupt: OnCorrupt = "fail",
    stats: ReadStats | None = None,
    expected_shape: tuple[int, ...] | None = None,
    resize: bool = False,
    default_label: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Decoded samples of ``paths`` in order; corrupt ones raise or are skipped and counted.

    A sample without image or label, or (given ``expected_shape``, CHW) with an image of
    another shape, counts as corrupt. With ``resize`` (and ``expected_shape``), images are resized and
    center-cropped to it (``decode.fit_image``); ``default_label`` is the label of a sample without one.
    """
    check_on_corrupt(on_corrupt)
    stats = stats if stats is not None else ReadStats()
    for path in paths:
        for raw in iter_tar_samples(path):
            try:
                fitted = resize or default_label is not None
                s = check_decoded(decode_fitted(raw, expected_shape or (), resize=resize, default_label=default_label)
                                  if fitted else decode_sample(raw), path, expected_shape)
            except DataError as e:
                if on_corrupt == "fail":
                    raise
                stats.skipped += 1
                stats.skipped_keys.append(raw["__key__"])
                log.warning("skipping corrupt sample (%d skipped so far): %s", stats.skipped, e)
                continue
            stats.samples += 1
            yield s


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    import torch  # here, so that building shards does not need torch

    return {
        "image": torch.from_numpy(np.stack([s["image"] for s in samples])),  # (B, C, H, W)
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),  # (B,)
        "caption": [s.get("caption", "") for s in samples],
        "key": [s["key"] for s in samples],
    }


def _shuffled(
    it: Iterator[dict[str, Any]], rng: np.random.Generator, buffer: int
) -> Iterator[dict[str, Any]]:
    """Shuffle-buffer: fill ``buffer`` samples, then emit a random one per new sample."""
    buf: list[dict[str, Any]] = []
    for s in it:
        if len(buf) < buffer:
            buf.append(s)
            continue
        i = int(rng.integers(len(buf)))
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)  # type: ignore[arg-type]
    yield from buf


def iterate_batches(
    directory: str | Path,
    split: str,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    epochs: int | None = None,
    drop_last: bool = True,
    on_corrupt: OnCorrupt = "fail",
    shuffle_buffer: int = 8192,
    stats: ReadStats | None = None,
) -> Iterator[dict[str, Any]]:
    """Batches of ``split``: ``{"image": (B, C, H, W) float32, "label": (B,) int64,
    "caption": list[str], "key": list[str]}``.

    ``epochs=None`` repeats forever. With ``shuffle``, each epoch permutes the shard order
    and passes samples through a shuffle buffer, both seeded by ``(seed, epoch)``.
    Skipped corrupt samples (``on_corrupt="skip"``) are logged and counted in ``stats``.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    check_on_corrupt(on_corrupt)
    paths = shard_paths(directory, split)
    manifest = read_manifest(directory)
    shape = expected_chw(manifest)
    if not paths:
        raise DataError(f"split {split!r} of {directory} has no shards")
    stats = stats if stats is not None else ReadStats()
    epoch = 0
    while epochs is None or epoch < epochs:
        rng = np.random.default_rng([seed, epoch])
        order = [paths[i] for i in rng.permutation(len(paths))] if shuffle else paths
        it = iter_samples(order, on_corrupt=on_corrupt, stats=stats, expected_shape=shape, resize=manifest.resize,
                          default_label=manifest.default_label)
        if shuffle:
            it = _shuffled(it, rng, shuffle_buffer)
        n_batches = 0
        batch: list[dict[str, Any]] = []
        for s in it:
            batch.append(s)
            if len(batch) == batch_size:
                yield _collate(batch)
                n_batches += 1
                batch = []
        if batch and not drop_last:
            yield _collate(batch)
            n_batches += 1
        if n_batches == 0:
            raise DataError(
                f"split {split!r} of {directory} yields no batch of {batch_size} "
                f"({stats.samples} samples read, drop_last={drop_last})"
            )
        epoch += 1


#: How many samples of a split :func:`load_split` reads unless told otherwise: evaluation works on a
#: bounded sample (the first ones in shard order), never on a whole split of unknown size.
HELD_OUT_LIMIT = 2048
#: The bounded sample of a *training* split that a driver reads in memory (caption vocabularies, class text
#: embeddings, baselines). Fixed, not a spec setting: what a stage trains must not depend on `eval`.
TRAIN_SAMPLE_LIMIT = 4096


def load_split(
    directory: str | Path, split: str, *, on_corrupt: OnCorrupt = "fail", limit: int | None = HELD_OUT_LIMIT
) -> dict[str, Any]:
    """The first ``limit`` samples of a split in memory, in shard order, for evaluation (images of any size
    resized and center-cropped where the manifest says so: never a random crop).

    Reading stops after ``limit`` decoded samples (default :data:`HELD_OUT_LIMIT`); ``limit=None`` reads
    the whole split (small data and tests only). Returns ``{"image": (N, C, H, W) float32 ndarray,
    "label": (N,) int64, "caption": list[str], "key": list[str], "skipped": int, "extra": list[dict]}``
    (``extra``: each sample's json member, ``{}`` without one; ``skipped``: corrupt samples skipped among
    those read), plus ``"factors": (N, F) int64`` when every sample's json holds a ``factors`` list (the
    generative factors of e.g. the ``sprites`` source).
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1 (or None for the whole split), got {limit}")
    stats = ReadStats()
    manifest = read_manifest(directory)
    paths = shard_paths(directory, split)
    samples = list(islice(iter_samples(paths, on_corrupt=on_corrupt, stats=stats, expected_shape=expected_chw(manifest),
                                       resize=manifest.resize, default_label=manifest.default_label), limit))
    if not samples:
        raise DataError(f"split {split!r} of {directory} has no samples")
    out = {
        "image": np.stack([s["image"] for s in samples]),
        "label": np.array([s["label"] for s in samples], dtype=np.int64),
        "caption": [s.get("caption", "") for s in samples],
        "key": [s["key"] for s in samples],
        "skipped": stats.skipped,
        "extra": [s.get("extra", {}) for s in samples],
    }
    if all("factors" in e for e in out["extra"]):
        out["factors"] = np.array([e["factors"] for e in out["extra"]], dtype=np.int64)
    return out
