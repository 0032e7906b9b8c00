"""The order in which training reads a split: deterministic, resumable, and the same for any worker count.

No Ray here (``pipeline.data.ray_data`` runs these functions in Ray Data tasks); everything is a pure
function of a :class:`StreamSpec` and a global batch number.

The order. Epochs follow each other without a seam: epoch ``e`` permutes the shards by ``(seed, e)``,
cuts the permuted list into windows of ``window`` shards and permutes the samples of each window by
``(seed, e, window)``. Global batch ``b`` is positions ``[b·g, (b+1)·g)`` of that endless sequence
(``g = micro × world``); rank ``r`` reads positions ``[b·g + r·micro, b·g + (r+1)·micro)``. So:

- global batch ``b`` depends on ``(seed, b, g)`` only: a checkpoint's step is its data position, a
  resumed run reads exactly the batches an uninterrupted one would, and resuming on another number of
  workers (same global batch) continues the epoch with exactly the samples not yet read;
- every sample of an epoch is read exactly once in that epoch (a batch may straddle two epochs);
- a rank reads only its own samples: it seeks to their members in the shard (a tar index), never
  re-reading the consumed part of an epoch, and memory holds a few batches, never a split.

Augmentation is drawn per sample from ``(seed, epoch, key)``: fresh every epoch, reproducible; so is the random
crop of images of any size (``resize``, shards written elsewhere), which held-out reads never take.

A shard is a local path or a URI (:mod:`pipeline.data.storage`): a remote tar's index is one sequential read of
the shard, a sample one ranged read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np

from pipeline.data import storage
from pipeline.data.decode import KNOWN_EXTS, OnCorrupt, check_decoded, decode_fitted
from pipeline.data.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 16  # shards whose samples are shuffled together


@dataclass(frozen=True)
class StreamSpec:
    """What a worker needs to read its part of a split (plain data: it travels to Ray tasks)."""

    paths: tuple[str, ...]  # the split's shards, in manifest order
    counts: tuple[int, ...]  # samples per shard (from the manifest)
    shape: tuple[int, int, int]  # decoded (C, H, W)
    seed: int = 0
    window: int = DEFAULT_WINDOW
    on_corrupt: OnCorrupt = "fail"
    hflip: bool = False  # augmentation (pixel data only)
    shift: int = 0
    resize: bool = False  # images of any size: resized and cropped to `shape` (decode.fit_image)
    crop: Literal["center", "random"] = "center"  # where, with `resize`: random is drawn from (seed, epoch, key)
    default_label: int | None = None  # the label of a sample without a .cls member (None: it is corrupt)

    @property
    def size(self) -> int:
        """Samples per epoch."""
        return int(sum(self.counts))


@dataclass(frozen=True)
class SampleIndex:
    """Where one shard's samples lie: per sample its key and ``{ext: (offset, size)}``."""

    keys: tuple[str, ...]
    members: tuple[dict[str, tuple[int, int]], ...]
    labels: tuple[int, ...] = ()  # with_labels: each sample's .cls (or 0)


def _seed(*parts: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])


@lru_cache(maxsize=4)
def epoch_order(spec: StreamSpec, epoch: int) -> np.ndarray:
    """The sample ids (0..N-1, shard by shard in manifest order) in the order epoch ``epoch`` reads them."""
    starts = np.concatenate([[0], np.cumsum(spec.counts)]).astype(np.int64)
    shards = np.random.default_rng(_seed(spec.seed, epoch)).permutation(len(spec.counts))
    parts = []
    for w in range(0, len(shards), max(1, spec.window)):
        ids = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in shards[w:w + spec.window]])
        parts.append(np.random.default_rng(_seed(spec.seed, epoch, w + 1)).permutation(ids))
    order = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    order.setflags(write=False)
    return order


def batch_ids(spec: StreamSpec, batch: int, *, rank: int, world: int, micro: int) -> tuple[np.ndarray, np.ndarray]:
    """(epoch, sample id) of each sample rank ``rank`` reads for global batch ``batch``."""
    n = spec.size
    if n == 0:
        raise DataError("the training split holds no samples")
    pos = batch * micro * world + rank * micro + np.arange(micro, dtype=np.int64)
    epochs, within = np.divmod(pos, n)
    ids = np.empty(micro, np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        ids[sel] = epoch_order(spec, int(e))[within[sel]]
    return epochs, ids


def locate(spec: StreamSpec, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shard number, index within the shard) of sample ids."""
    starts = np.cumsum(spec.counts) - np.asarray(spec.counts)
    shard = np.searchsorted(np.cumsum(spec.counts), ids, side="right")
    return shard, ids - starts[shard]


def _open_tar(path: str) -> tarfile.TarFile:
    """A local tar read by seeking from header to header; a remote one as one sequential, buffered stream."""
    if storage.is_uri(path):
        return tarfile.open(fileobj=storage.open_stream(path), mode="r|")
    return tarfile.open(path, mode="r:")


@lru_cache(maxsize=64)
def shard_index(path: str, expected: int | None = None, with_labels: bool = False) -> SampleIndex:
    """Where each sample's members lie in a shard (``with_labels``: and its ``.cls`` label, 0 where a sample has
    none), from its tar headers; a remote shard's index is kept on this node's disk (:func:`node_index`)."""
    index = node_index(path, with_labels) if storage.is_uri(path) else scan_index(path, with_labels)
    if expected is not None and len(index.keys) != expected:
        raise DataError(f"shard {storage.display(path)} holds {len(index.keys)} samples, its manifest says "
                        f"{expected}; rebuild the dataset")
    return index


INDEX_CACHE = os.path.join(tempfile.gettempdir(), "genpipe-shard-index")  # remote shards' indexes, per node


def node_index(path: str, with_labels: bool = False) -> SampleIndex:
    """A remote shard's index, scanned once per node: the scan (one stream of the whole shard) is kept under
    INDEX_CACHE by (URI, size, modification time), so this node's other processes read a small file instead."""
    fs, p = storage.filesystem(path)
    info = fs.get_file_info(p)
    stamp = f"{path}|{info.size}|{info.mtime_ns}|{with_labels}"
    file = os.path.join(INDEX_CACHE, hashlib.sha256(stamp.encode()).hexdigest() + ".json")
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
        return SampleIndex(tuple(raw["keys"]), tuple({k: (int(o), int(n)) for k, (o, n) in m.items()}
                                                     for m in raw["members"]), tuple(raw["labels"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not scanned on this node yet (or a torn file): scan it
    index = scan_index(path, with_labels)
    os.makedirs(INDEX_CACHE, exist_ok=True)
    tmp = f"{file}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"keys": index.keys, "members": index.members, "labels": index.labels}, f)
    os.replace(tmp, file)
    return index


def scan_index(path: str, with_labels: bool = False) -> SampleIndex:
    """Scan a tar's headers (a local one by seeking past the data, a remote one as one stream) for its index."""
    keys: list[str] = []
    seen: set[str] = set()
    members: list[dict[str, tuple[int, int]]] = []
    labels: list[int] = []
    tar = None
    try:
        with _open_tar(path) as tar:
            for ti in tar:
                if not ti.isreg():
                    continue
                key, dot, ext = ti.name.partition(".")
                if not dot or ext not in KNOWN_EXTS:
                    continue  # .pyd, .pth, ...: never read, never deserialised
                if not keys or keys[-1] != key:
                    if key in seen:
                        raise DataError(f"shard {path}: members of sample {key} are not contiguous")
                    keys.append(key)
                    seen.add(key)
                    members.append({})
                    labels.append(0)
                members[-1][ext] = (ti.offset_data, ti.size)
                if with_labels and ext == "cls":
                    labels[-1] = _label(tar, ti, path)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"shard {storage.display(path)} is unreadable ({type(e).__name__}: {e}); verify or rebuild "
                        "the dataset") from e
    finally:
        if tar is not None and tar.fileobj is not None and storage.is_uri(path):
            tar.fileobj.close()  # a stream tarfile does not close a file object it was given
    return SampleIndex(tuple(keys), tuple(members), tuple(labels) if with_labels else ())


def _label(tar: tarfile.TarFile, ti: tarfile.TarInfo, path: str) -> int:
    f = tar.extractfile(ti)
    data = f.read() if f is not None else b""
    try:
        return int(data.decode("ascii").strip())
    except ValueError:
        raise DataError(f"corrupt member {ti.name} in shard {storage.display(path)}: not an integer label") from None


def crop_draw(seed: int, epoch: int, key: str) -> int:
    """The random crop of a sample in an epoch (``decode.fit_image``'s ``draw``), from (seed, epoch, key)."""
    return int.from_bytes(hashlib.blake2b(f"crop/{seed}/{epoch}/{key}".encode(), digest_size=8).digest(), "little")


def _key_hash(seed: int, epoch: int, key: str) -> bytes:
    return hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()


def augment_sample(image: np.ndarray, *, seed: int, epoch: int, key: str, hflip: bool, shift: int) -> np.ndarray:
    """A random flip and translation (zero padded) of one (C, H, W) image, drawn from (seed, epoch, key)."""
    if not hflip and shift <= 0:
        return image
    out = np.empty(image.shape, image.dtype)
    _augment_into(out, image, seed=seed, epoch=epoch, key=key, hflip=hflip, shift=shift)
    return out


def _augment_into(out: np.ndarray, image: np.ndarray, *, seed: int, epoch: int, key: str, hflip: bool,
                  shift: int) -> None:
    """`augment_sample` written into ``out`` (same shape; one copy, no temporaries)."""
    if not hflip and shift <= 0:
        out[...] = image
        return
    h = _key_hash(seed, epoch, key)
    if hflip and h[0] & 1:
        image = image[..., ::-1]
    if shift <= 0:
        out[...] = image
        return
    dy, dx = h[1] % (2 * shift + 1) - shift, h[2] % (2 * shift + 1) - shift
    height, width = image.shape[-2:]
    if dy or dx:  # 0 = black (uint8), i.e. -1 in [-1, 1], where the image moved away
        out[:, :max(0, dy)] = 0
        out[:, height + min(0, dy):] = 0
        out[:, :, :max(0, dx)] = 0
        out[:, :, width + min(0, dx):] = 0
    out[:, max(0, dy):height + min(0, dy), max(0, dx):width + min(0, dx)] = \
        image[:, max(0, -dy):height + min(0, -dy), max(0, -dx):width + min(0, -dx)]


def read_samples(spec: StreamSpec, ids: np.ndarray) -> list[dict[str, Any]]:
    """Raw members (``{"__key__", "__url__", ext: bytes}``) of sample ids, read by seeking in their shards: one
    read per sample (its members lie together), in file order within each shard."""
    shard, local = locate(spec, ids)
    out: list[dict[str, Any] | None] = [None] * len(ids)
    for s in np.unique(shard):
        path = spec.paths[int(s)]
        index = shard_index(path, spec.counts[int(s)])
        mine = np.flatnonzero(shard == s)
        with storage.open_random(path) as f:
            for i in mine[np.argsort(local[mine], kind="stable")]:
                j = int(local[i])
                members = index.members[j]
                raw: dict[str, Any] = {"__key__": index.keys[j], "__url__": path}
                if members:
                    lo = min(offset for offset, _ in members.values())
                    hi = max(offset + size for offset, size in members.values())
                    f.seek(lo)
                    data = f.read(hi - lo)
                    for ext, (offset, size) in members.items():
                        raw[ext] = data[offset - lo:offset - lo + size]
                out[int(i)] = raw
    return out  # type: ignore[return-value]


def read_batches(spec: StreamSpec, batches: np.ndarray, *, rank: int, world: int, micro: int) -> dict[str, np.ndarray]:
    """Rank ``rank``'s samples of global batches ``batches``, decoded, as one numpy batch.

    Columns: ``image`` (uint8 (B, C, H, W) for images, float32 for latents), ``label``, ``caption``, ``key``,
    ``batch`` (the global batch number of each row), ``epoch`` and ``ok`` (False: corrupt, skipped in
    ``on_corrupt=skip`` mode; its image is zeros).
    """
    n = len(batches) * micro
    ids = np.empty(n, np.int64)
    epochs = np.empty(n, np.int64)
    for k, b in enumerate(batches):
        epochs[k * micro:(k + 1) * micro], ids[k * micro:(k + 1) * micro] = batch_ids(
            spec, int(b), rank=rank, world=world, micro=micro)
    images: np.ndarray | None = None  # (n, C, H, W), allocated at the first decoded image (its dtype)
    labels, captions, keys = np.full(n, -1, np.int64), np.full(n, "", dtype=object), np.empty(n, dtype=object)
    ok = np.zeros(n, bool)
    random_crop = spec.resize and spec.crop == "random"
    for i, raw in enumerate(read_samples(spec, ids)):
        keys[i] = raw["__key__"]
        try:
            draw = crop_draw(spec.seed, int(epochs[i]), raw["__key__"]) if random_crop else None
            s = check_decoded(decode_fitted(raw, spec.shape, resize=spec.resize, default_label=spec.default_label,
                                            draw=draw, uint8=True), raw["__url__"], spec.shape)
        except DataError as err:
            if spec.on_corrupt == "fail":
                raise
            log.debug("corrupt sample, skipped by the worker (data.on_corrupt=skip): %s", err)
            continue  # image stays zeros, label -1
        image = s["image"]
        if images is None:
            images = np.zeros((n, *spec.shape), image.dtype)
        if image.dtype == np.uint8:  # pixels: augmented straight into the batch
            _augment_into(images[i], image, seed=spec.seed, epoch=int(epochs[i]), key=s["key"], hflip=spec.hflip,
                          shift=spec.shift)
        else:
            images[i] = image
        labels[i], captions[i], keys[i], ok[i] = s["label"], s.get("caption", ""), s["key"], True
    return {
        "image": images if images is not None else np.zeros((n, *spec.shape), np.uint8),
        "label": labels,
        "caption": captions,
        "key": keys,
        "batch": np.repeat(np.asarray(batches, np.int64), micro),
        "epoch": epochs,
        "ok": ok,
    }


def spec_for(directory: str, split: str, *, seed: int, window: int = DEFAULT_WINDOW, on_corrupt: OnCorrupt = "fail",
             hflip: bool = False, shift: int = 0, crop: Literal["center", "random"] = "center") -> StreamSpec:
    """The stream of ``split`` of a dataset (its manifest gives the shards and counts; ``crop`` applies where it
    says images are resized)."""
    from pipeline.data.shards import expected_chw, read_manifest, shard_paths

    manifest = read_manifest(directory)
    paths = shard_paths(directory, split)
    if not paths:
        raise DataError(f"split {split!r} of {directory} has no shards")
    counts = tuple(sh.num_samples for sh in manifest.splits[split].shards)
    pixel = manifest.encoding != "npy"
    return StreamSpec(paths=tuple(paths), counts=counts, shape=expected_chw(manifest), seed=seed, window=window,
                      on_corrupt=on_corrupt, hflip=hflip and pixel, shift=shift if pixel else 0,
                      resize=manifest.resize, crop=crop, default_label=manifest.default_label)


def plain_batches(spec: StreamSpec, *, rank: int = 0, world: int = 1, micro: int, start: int = 0):
    """The same endless (epoch, batch) stream as the Ray path, read in this process (tests, benchmarks)."""
    b = start
    while True:
        yield b, read_batches(spec, np.asarray([b]), rank=rank, world=world, micro=micro)
        b += 1
