"""The Ray Data path: shards -> ``ray.data.read_webdataset`` -> decoding in Ray Data tasks.

``read_webdataset`` is called with ``decoder=None`` (no built-in decoding at all, so
nothing can be unpickled) and ``suffixes`` limited to the members we write; the raw
bytes are then decoded by :func:`pipeline.data.decode.decode_sample` in ``map_batches``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
from ray.data import ExecutionResources, FileShuffleConfig
from ray.data.collate_fn import NumpyBatchCollateFn

from pipeline.data import storage
from pipeline.data.decode import KNOWN_EXTS, OnCorrupt, check_decoded, check_on_corrupt, decode_fitted
from pipeline.data.errors import DataError
from pipeline.data.shards import expected_chw, read_manifest, shard_paths

log = logging.getLogger(__name__)


def _is_member(value: Any) -> bool:
    return isinstance(value, bytes | bytearray | memoryview)


def decode_batch(
    batch: dict[str, np.ndarray], *, on_corrupt: OnCorrupt, expected_shape: tuple[int, ...], resize: bool = False,
    default_label: int | None = None,
) -> dict[str, np.ndarray]:
    """Raw WebDataset rows (``__key__``, ``__url__``, ext -> bytes) to decoded columns (``resize``: images of any
    size center-cropped to ``expected_shape``; ``default_label``: the label of a row without one).

    Returns ``{"image": (B, C, H, W) float32, "label": (B,) int64, "caption": (B,) str,
    "key": (B,) str}``; in skip mode, corrupt rows are dropped and logged with their count.
    """
    keys = batch["__key__"]
    cols = [c for c in batch if c in KNOWN_EXTS or c in ("__key__", "__url__")]
    images, labels, captions, out_keys, skipped = [], [], [], [], []
    for i in range(len(keys)):
        members = {c: batch[c][i] for c in cols if c.startswith("__") or _is_member(batch[c][i])}
        try:
            s = check_decoded(decode_fitted(members, expected_shape, resize=resize, default_label=default_label),
                              str(members.get("__url__", "?")), expected_shape)
        except DataError as e:
            if on_corrupt == "fail":
                raise
            skipped.append(str(e))
            continue
        images.append(s["image"])
        labels.append(s["label"])
        captions.append(s.get("caption", ""))
        out_keys.append(s["key"])
    if skipped:
        log.warning("skipped %d corrupt sample(s) in this batch: %s", len(skipped), "; ".join(skipped))
    return {
        "image": np.stack(images) if images else np.zeros((0, *expected_shape), np.float32),
        "label": np.asarray(labels, dtype=np.int64),
        "caption": np.asarray(captions, dtype=object),
        "key": np.asarray(out_keys, dtype=object),
    }


def ray_dataset(
    directory: str | Path,
    split: str,
    *,
    shuffle_seed: int | None = None,
    on_corrupt: OnCorrupt = "fail",
    batch_size: int = 256,
) -> ray.data.Dataset:
    """A Ray Dataset of ``{"image": float32 CHW in [-1, 1] (or latent), "label": int64, "caption", "key"}``.

    ``shuffle_seed`` shuffles the shard order (reseeded every execution, i.e. each epoch);
    row-level shuffling is the consumer's ``local_shuffle_buffer_size``. Decoding runs in
    Ray Data tasks (``map_batches`` of ``batch_size`` rows).
    """
    check_on_corrupt(on_corrupt)
    manifest = read_manifest(directory)
    paths = shard_paths(directory, split)
    if not paths:
        raise DataError(f"split {split!r} of {directory} has no shards")
    filesystem = None
    if storage.is_uri(paths[0]):  # the bucket's filesystem as pipeline.data.storage opens it (its endpoint too)
        filesystem = storage.filesystem(paths[0])[0]
        paths = [storage.filesystem(p)[1] for p in paths]
    ds = ray.data.read_webdataset(
        paths,
        filesystem=filesystem,
        decoder=None,  # raw bytes only: Ray's default decoder is never involved
        suffixes=list(KNOWN_EXTS),  # other members (.pyd, .pth, ...) are dropped while grouping
        shuffle=FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None,
        file_extensions=["tar"],
    )
    return ds.map_batches(
        decode_batch,
        batch_size=batch_size,
        batch_format="numpy",
        fn_kwargs={"on_corrupt": on_corrupt, "expected_shape": expected_chw(manifest), "resize": manifest.resize,
                   "default_label": manifest.default_label},
    )


def _owned(a: np.ndarray, dtype: type) -> np.ndarray:
    """A writable, contiguous array of ``dtype`` (Ray hands out read-only views)."""
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if a.flags.writeable else a.copy()


class TorchCollate(NumpyBatchCollateFn):
    """Numpy batch -> the local iterator's batch format: image/label tensors, caption/key lists.

    Ray's default torch collation cannot convert the string columns; use this as
    ``collate_fn`` of ``iter_torch_batches`` (or call :func:`torch_batches`).
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        return {
            "image": torch.from_numpy(_owned(batch["image"], np.float32)),  # (B, C, H, W)
            "label": torch.from_numpy(_owned(batch["label"], np.int64)),  # (B,)
            "caption": [str(c) for c in batch["caption"]],
            "key": [str(k) for k in batch["key"]],
        }


def torch_batches(
    data: ray.data.Dataset | ray.data.DataIterator,
    batch_size: int,
    *,
    drop_last: bool = True,
    local_shuffle_buffer_size: int | None = None,
    local_shuffle_seed: int | None = None,
    prefetch_batches: int = 1,
) -> Iterator[dict[str, Any]]:
    """Batches of a :func:`ray_dataset` (or a Ray Train dataset shard) in the local iterator's format."""
    yield from data.iter_torch_batches(
        batch_size=batch_size,
        drop_last=drop_last,
        collate_fn=TorchCollate(),
        local_shuffle_buffer_size=local_shuffle_buffer_size,
        local_shuffle_seed=local_shuffle_seed,
        prefetch_batches=prefetch_batches,
    )


# ---------------------------------------------------------------- training: one deterministic stream per worker

# A Ray Data task costs about 15 ms of CPU besides its work (the executor, the task's wrapper, the raylet; a plain
# Ray task costs about 1 ms), so tasks are large: about TARGET_BYTES of decoded samples, at most MAX_ROWS. What a
# rank's stream holds in the object store is bounded: IN_FLIGHT_BLOCKS blocks queued or being made (Ray Data's
# backpressure), PREFETCH_BLOCKS fetched ahead and the one in use; blocks shrink so that the ranks on a node keep
# that within STORE_SHARE of its object store (a stream that overfills the store makes Ray spill to disk).
TARGET_BYTES = 32 << 20
MAX_ROWS = 4096
IN_FLIGHT_BLOCKS = 3
PREFETCH_BLOCKS = 1
STORE_SHARE = 0.5


def sample_bytes(spec: Any) -> int:
    """Decoded bytes of one sample: uint8 pixels, or float32 latents (``.npy`` members)."""
    from pipeline.data.stream import shard_index

    index = shard_index(spec.paths[0], spec.counts[0]) if spec.paths else None
    latent = bool(index and index.members and "npy" in index.members[0])
    return int(np.prod(spec.shape)) * (4 if latent else 1)


def _node_share(world: int) -> tuple[float, int]:
    """This rank's share of its node: (STORE_SHARE of the node's object store, the machine's cores), divided
    among the ranks expected on it (``world`` over the nodes; all of them on one machine)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    store = next((n["Resources"].get("object_store_memory", 0) for n in nodes if n.get("NodeID") == here), 0)
    ranks = max(1, -(-world // max(1, len(nodes))))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return (STORE_SHARE * store / ranks if store else float("inf")), max(1, cores // ranks)


def batches_per_task(spec: Any, micro: int, share: float = float("inf")) -> int:
    """Global batches each Ray Data task reads for one rank: about TARGET_BYTES of decoded samples (less where a
    rank's ``share`` of the object store asks for smaller blocks), at most MAX_ROWS samples, at least one batch."""
    per_block = min(TARGET_BYTES, share / (IN_FLIGHT_BLOCKS + PREFETCH_BLOCKS + 1))
    rows = min(MAX_ROWS, max(1, int(per_block // max(1, sample_bytes(spec)))))
    return max(1, rows // max(1, micro))


def _read_task(batch: dict[str, np.ndarray], *, spec: Any, rank: int, world: int, micro: int,
               first: int) -> dict[str, np.ndarray]:
    from pipeline.data.stream import read_batches

    return read_batches(spec, first + np.asarray(batch["id"], np.int64), rank=rank, world=world, micro=micro)


def worker_stream(spec: Any, *, rank: int, world: int, micro: int, start: int, count: int
                  ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Rank ``rank``'s part of global batches ``start, start+1, ...``: ``(batch number, numpy batch)``.

    The order is :mod:`pipeline.data.stream`'s; reading, decoding and augmenting run in Ray Data tasks (one
    fused read+decode task per block of :func:`batches_per_task` batches, uint8 pixels until the worker) while
    the worker trains, in order (``preserve_order``). What is in flight is bounded (see ``IN_FLIGHT_BLOCKS``):
    memory holds a few blocks, whatever the size of the split. Batches are views of the blocks (no copy). After
    ``count`` batches it goes on with a new read of the following ones (steps skipped for a non-finite loss
    consume batches too).
    """
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    share, cores = _node_share(world)
    per_task = batches_per_task(spec, micro, share)
    budget = IN_FLIGHT_BLOCKS * per_task * micro * sample_bytes(spec)
    first = start
    while True:
        n = max(count, per_task)
        # batch_size=None: the range's read and the decoding fuse into one task per block
        ds = ray.data.range(n, override_num_blocks=max(1, -(-n // per_task)))
        ds = ds.map_batches(_read_task, batch_size=None, batch_format="numpy", zero_copy_batch=True,
                            fn_kwargs={"spec": spec, "rank": rank, "world": world, "micro": micro, "first": first})
        limits = ds.context.execution_options.resource_limits  # this dataset's, not the process's
        ds.context.execution_options.resource_limits = limits.min(ExecutionResources.for_limits(
            object_store_memory=budget, cpu=cores))  # more read tasks than cores only delay the first block
        pending: dict[str, list[np.ndarray]] = {}
        rows = 0
        for block in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=PREFETCH_BLOCKS):
            nums = block["batch"]
            cuts = [0, *(np.flatnonzero(nums[1:] != nums[:-1]) + 1).tolist(), len(nums)]
            for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):  # a batch's `micro` rows, in order
                for k, v in block.items():
                    pending.setdefault(k, []).append(v[lo:hi])
                rows += hi - lo
                if rows == micro:
                    yield int(nums[lo]), {k: np.concatenate(v) if len(v) > 1 else v[0] for k, v in pending.items()}
                    pending, rows = {}, 0
            del block, nums  # the next block comes in while this one's object may go
        first += n
        count = per_task * 4
