"""Writing WebDataset shards (plain ustar tars) atomically, and their manifest.

A dataset directory holds ``train-000000.tar ...``, ``test-000000.tar ...`` and
``manifest.json``, written last. Each shard is written under a hidden temporary name in
the same directory, fsynced and only then renamed into place, so a file with a final
name is always complete; a directory without ``manifest.json`` is an unfinished build.

Shards written elsewhere (img2dataset and the like: ``*.tar`` of ``<key>.jpg|png|webp`` + ``.txt`` + ``.json``,
``.cls`` optional, no manifest) are counted by :func:`foreign_manifest` into a manifest of the same model, cached
on the driver's disk (never beside the shards) with ``root`` naming where the shards are and ``resize`` set:
their images are resized and cropped to the job's size as they are read. A dataset is named by its directory
(local, or a URI: see :mod:`pipeline.data.storage`) or by such a manifest file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline import __version__
from pipeline.data import storage
from pipeline.data.errors import DataError
from pipeline.data.sources import Sample, iter_source, source_classes

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "genpipe-shards/1"
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_]{1,40}$")
_SHARD_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,40}-[A-Za-z0-9_-]{1,80}\.tar$")  # <prefix>-<id>.tar


# ---------------------------------------------------------------- manifest model


class ShardInfo(BaseModel):
    """One shard file of a split."""

    model_config = ConfigDict(extra="forbid")
    name: str
    num_samples: int = Field(ge=0)
    sha256: str | None = Field(pattern=r"^[0-9a-f]{64}$")  # None: counted, not written here (not hashed)
    bytes: int = Field(ge=0)


class SplitInfo(BaseModel):
    """One split: its sample count, per-label counts and shards."""

    model_config = ConfigDict(extra="forbid")
    num_samples: int = Field(ge=0)
    labels: dict[int, int]
    shards: list[ShardInfo]


class Manifest(BaseModel):
    """Contents of ``manifest.json``."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["genpipe-shards/1"] = MANIFEST_FORMAT
    source: str
    created_by: str = f"genpipe {__version__}"
    encoding: Literal["png", "npy", "image"] = "png"  # member holding the image / latent ("image": jpg|png|webp)
    image_size: list[int] = Field(min_length=3, max_length=3)  # [H, W, C]; for latents the array is (C, H, W)
    root: str | None = None  # the shards' directory (path or URI) when this manifest is not beside them
    resize: bool = False  # images of any size, resized + cropped to image_size as they are read (decode.fit_image)
    default_label: int | None = None  # the label of a sample without a .cls member (None: it is corrupt)
    num_classes: int = Field(ge=0)
    class_names: list[str] | None = None
    seed: int | None = None
    held_out: float | None = None
    splits: dict[str, SplitInfo]


def expected_chw(manifest: Manifest) -> tuple[int, int, int]:
    """The decoded image / latent shape (C, H, W) that the manifest promises."""
    h, w, c = manifest.image_size
    return (c, h, w)


# ---------------------------------------------------------------- tar writing


class _HashingFile(io.RawIOBase):
    """Write-through file wrapper that hashes and counts what is written."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:  # type: ignore[override]
        n = self._f.write(b)
        self.sha.update(b)
        self.nbytes += len(b)
        return n

    def tell(self) -> int:
        return self.nbytes


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


class _ShardWriter:
    """Writes samples (dicts of member ext -> bytes) into numbered ustar shards."""

    def __init__(self, out_dir: Path, prefix: str, shard_size: int) -> None:
        if not _PREFIX_RE.match(prefix):
            raise DataError(f"shard prefix {prefix!r} must match {_PREFIX_RE.pattern}")
        if shard_size < 1:
            raise DataError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.shards: list[ShardInfo] = []
        self.labels: dict[int, int] = {}
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._file: io.BufferedWriter | None = None
        self._hash: _HashingFile | None = None
        self._tmp: Path | None = None
        self._count = 0
        out_dir.mkdir(parents=True, exist_ok=True)

    def _name(self) -> str:
        """The file name of the shard being written."""
        return f"{self.prefix}-{len(self.shards):06d}.tar"

    def _open(self) -> None:
        name = self._name()
        self._tmp = self.out_dir / f".{name}.tmp-{os.getpid()}"
        self._file = open(self._tmp, "wb")  # closed in _close() or abort()
        self._hash = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hash, mode="w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def add(self, key: str, members: dict[str, bytes], label: int) -> None:
        """Add one sample; members are written in sorted extension order."""
        if not _KEY_RE.match(key):
            raise DataError(f"sample key {key!r} must match {_KEY_RE.pattern} (no dots, no slashes)")
        if key in self._keys:
            raise DataError(f"duplicate sample key {key!r} in {self.out_dir}/{self.prefix}-*.tar")
        self._keys.add(key)
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for ext in sorted(members):
            data = members[ext]
            ti = tarfile.TarInfo(f"{key}.{ext}")
            ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            self._tar.addfile(ti, io.BytesIO(data))
        self.labels[label] = self.labels.get(label, 0) + 1
        self._count += 1
        if self._count >= self.shard_size:
            self._close()

    def _close(self) -> None:
        assert self._tar is not None and self._file is not None and self._hash and self._tmp
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = self._name()
        os.replace(self._tmp, self.out_dir / name)
        _fsync_dir(self.out_dir)
        self.shards.append(
            ShardInfo(
                name=name, num_samples=self._count, sha256=self._hash.sha.hexdigest(), bytes=self._hash.nbytes
            )
        )
        self._tar = self._file = self._hash = self._tmp = None

    def finish(self) -> list[ShardInfo]:
        """Close the last (partial) shard and return all shards written."""
        if self._tar is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its temporary file); finished shards stay."""
        if self._file is not None:
            self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._tar = self._file = self._hash = self._tmp = None

    @property
    def num_samples(self) -> int:
        return sum(self.labels.values())

    def split_info(self) -> SplitInfo:
        return SplitInfo(
            num_samples=self.num_samples, labels=dict(sorted(self.labels.items())), shards=self.shards
        )


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, C) with C in {1, 3} -> lossless PNG bytes."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise DataError(f"expected a uint8 (H, W, 1|3) image, found {image.dtype} {image.shape}")
    pil = Image.fromarray(
        image[:, :, 0] if image.shape[2] == 1 else image, mode="L" if image.shape[2] == 1 else "RGB"
    )
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _sample_members(s: Sample) -> dict[str, bytes]:
    members = {
        "png": encode_png(s["image"]),
        "cls": str(int(s["label"])).encode("ascii"),
        "txt": s["caption"].encode("utf-8"),
    }
    if s.get("extra"):
        members["json"] = json.dumps(s["extra"], sort_keys=True, separators=(",", ":")).encode("utf-8")
    return members


def _write(
    items: Iterable[tuple[str, dict[str, bytes], int]], out_dir: Path, prefix: str, shard_size: int
) -> _ShardWriter:
    w = _ShardWriter(Path(out_dir), prefix, shard_size)
    try:
        for key, members, label in items:
            w.add(key, members, label)
        w.finish()
    except BaseException:
        w.abort()
        raise
    return w


def write_shards(
    samples: Iterable[Sample], out_dir: str | Path, *, prefix: str = "train", shard_size: int = 512
) -> list[ShardInfo]:
    """Write samples as ``<prefix>-NNNNNN.tar`` ustar shards (png, cls, txt, json members)."""
    items = ((s["key"], _sample_members(s), int(s["label"])) for s in samples)
    return _write(items, Path(out_dir), prefix, shard_size).shards


def _array_items(rows: Iterable[dict[str, Any]]) -> Iterator[tuple[str, dict[str, bytes], int]]:
    """Latent rows as (key, members, label): ``npy`` (float32, no pickle), ``cls`` and ``txt`` members."""
    for r in rows:
        arr = r["array"] if "array" in r else r["image"]
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(np.asarray(arr, dtype=np.float32)), allow_pickle=False)
        members = {
            "npy": buf.getvalue(),
            "cls": str(int(r["label"])).encode("ascii"),
            "txt": str(r.get("caption", "")).encode("utf-8"),
        }
        yield str(r["key"]), members, int(r["label"])


def write_array_shards(
    rows: Iterable[dict[str, Any]], out_dir: str | Path, *, prefix: str = "train", shard_size: int = 512
) -> list[ShardInfo]:
    """Write latent rows ``{"key", "array" (or "image"), "label", "caption"}`` as npy shards.

    Members: ``<key>.npy`` (float32, ``np.save(allow_pickle=False)``), ``<key>.cls``,
    ``<key>.txt``.
    """
    return _write(_array_items(rows), Path(out_dir), prefix, shard_size).shards


class _NamedShardWriter(_ShardWriter):
    """A :class:`_ShardWriter` that writes exactly one shard, under a name the caller chose."""

    def __init__(self, out_dir: Path, name: str) -> None:
        if not _SHARD_NAME_RE.match(name):
            raise DataError(f"shard name {name!r} must match {_SHARD_NAME_RE.pattern}")
        super().__init__(out_dir, name.split("-", 1)[0], shard_size=1 << 62)
        self.name = name

    def _name(self) -> str:
        if self.shards:
            raise DataError(f"shard {self.name} is already written")
        return self.name


def write_array_shard(rows: Iterable[dict[str, Any]], out_dir: str | Path, name: str) -> tuple[ShardInfo, SplitInfo]:
    """Write latent rows (as :func:`write_array_shards`) into ONE shard file ``out_dir/name``, atomically.

    ``name`` is ``<split>-<id>.tar`` (``<split>`` a shard prefix, ``<id>`` like a sample key), so a writer
    that cannot number its shards (one of many Ray Data tasks) can still give each a unique, stable name.
    Returns the shard's entry and its split info (sample and per-label counts) for the manifest.
    """
    w = _NamedShardWriter(Path(out_dir), name)
    try:
        for key, members, label in _array_items(rows):
            w.add(key, members, label)
        w.finish()
    except BaseException:
        w.abort()
        raise
    if not w.shards:
        raise DataError(f"shard {name}: no rows to write")
    return w.shards[0], w.split_info()


# ---------------------------------------------------------------- dataset build


def _stratified_split(labels: np.ndarray, held_out: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out (test) samples: round(held_out * n_c) of each class c."""
    rng = np.random.default_rng([seed, 0x5E17])
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = int(round(held_out * len(idx)))
        if 0 < held_out and len(idx) > 1:
            n_test = min(max(n_test, 1), len(idx) - 1)  # keep every class in both splits
        test[rng.permutation(idx)[:n_test]] = True
    return test


def write_manifest(out_dir: str | Path, manifest: Manifest) -> None:
    """Atomically write ``manifest.json`` (the last step of any build) into a directory or a bucket prefix."""
    data = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=False).encode("utf-8") + b"\n"
    if storage.is_uri(out_dir):  # an object appears whole or not at all
        storage.write_bytes(storage.join(str(out_dir), MANIFEST), data)
    else:
        _atomic_write_bytes(Path(out_dir) / MANIFEST, data)


def build_dataset(
    source: str,
    out: str | Path,
    *,
    image_size: int | None = None,
    held_out: float = 0.15,
    shard_size: int = 512,
    seed: int = 0,
    overwrite: bool = False,
) -> Manifest:
    """Build ``train``/``test`` shards and ``manifest.json`` (written last) from ``source``.

    The held-out split is stratified by label and deterministic in ``seed``; each split
    is shuffled (deterministically) before writing so every shard mixes labels. An
    existing dataset in ``out`` is replaced only with ``overwrite=True``.
    """
    out = Path(out)
    if not 0.0 <= held_out < 1.0:
        raise DataError(f"held_out must be in [0, 1), got {held_out}")
    if (out / MANIFEST).exists():
        if not overwrite:
            raise DataError(f"{out} already holds a dataset ({MANIFEST}); pass overwrite=True to rebuild it")
        (out / MANIFEST).unlink()  # from here on the directory reads as unfinished
        _fsync_dir(out)
    class_names = source_classes(source)
    samples = list(iter_source(source, image_size=image_size, seed=seed))
    if not samples:
        raise DataError(f"source {source!r} yielded no samples")
    shape = samples[0]["image"].shape
    for s in samples:
        if s["image"].shape != shape or s["image"].dtype != np.uint8:
            raise DataError(
                f"sample {s['key']} of {source!r}: found {s['image'].dtype} {s['image'].shape}, "
                f"expected uint8 {shape}"
            )
    labels = np.array([s["label"] for s in samples])
    test = _stratified_split(labels, held_out, seed)
    rng = np.random.default_rng([seed, 0x0ADE])
    splits: dict[str, SplitInfo] = {}
    for split, mask in (("train", ~test), ("test", test)):
        order = rng.permutation(np.flatnonzero(mask))
        items = ((samples[i]["key"], _sample_members(samples[i]), int(samples[i]["label"])) for i in order)
        splits[split] = _write(items, out, split, shard_size).split_info()
    manifest = Manifest(
        source=source,
        image_size=[int(shape[0]), int(shape[1]), int(shape[2])],
        num_classes=len(class_names),
        class_names=class_names,
        seed=seed,
        held_out=held_out,
        splits=splits,
    )
    write_manifest(out, manifest)
    _remove_stale(out, manifest)
    log.info(
        "built %s: %s",
        out,
        ", ".join(f"{k} {v.num_samples} samples in {len(v.shards)} shards" for k, v in splits.items()),
    )
    return manifest


def _remove_stale(out: Path, manifest: Manifest) -> None:
    """Remove shards of an earlier build that the new manifest does not list."""
    listed = {sh.name for sp in manifest.splits.values() for sh in sp.shards}
    for split in manifest.splits:
        for p in out.glob(f"{split}-*.tar"):
            if p.name not in listed:
                p.unlink()


# ---------------------------------------------------------------- reading / checking

MANIFEST_CACHE = ".pipeline/manifests"  # counted / relocated manifests, on the driver's disk
_OUR_SHARD_RE = re.compile(r"^(train|test)-\d{6}\.tar$")


def unfinished_build(names: list[str]) -> bool:
    """True when tar names (without a manifest) are those `pipeline data build` writes: an interrupted build."""
    return bool(names) and all(_OUR_SHARD_RE.match(n) for n in names)


def _manifest_file(directory: str | Path) -> tuple[str, str] | None:
    """(manifest file, shard root) of a dataset named by a manifest file itself, else None."""
    d = str(directory)
    if d.endswith(".json") and not storage.is_uri(d) and os.path.isfile(d):
        return d, os.path.dirname(os.path.abspath(d))
    return None


def _missing_manifest(d: str) -> DataError:
    if not storage.is_dir(d):
        return DataError(f"dataset directory {storage.display(d)} does not exist; build it with "
                         f"`pipeline data build --out {d}`")
    tars = [name for name, _ in storage.list_files(d, ".tar")]
    if not tars:
        return DataError(f"{storage.display(d)} holds no shards and no {MANIFEST}; build it with "
                         f"`pipeline data build --out {d}`")
    if unfinished_build(tars):
        return DataError(f"{storage.display(d)} has {len(tars)} shard(s) but no {MANIFEST}: an unfinished or "
                         "interrupted build; rebuild it with `pipeline data build`")
    return DataError(f"{storage.display(d)} has {len(tars)} shard(s) but no {MANIFEST}: shards written elsewhere "
                     "(e.g. by img2dataset) are read with data.source: shards and data.image_size set")


def read_manifest(directory: str | Path) -> Manifest:
    """Read and check a dataset's manifest: every listed shard must exist with its recorded size.

    ``directory`` holds ``manifest.json`` (a local path or a URI), or is a manifest file whose ``root`` says where
    the shards are (what :func:`open_dataset` writes).
    """
    located = _manifest_file(directory)
    if located is not None:
        path, root = located
    else:
        root = str(directory)
        path = storage.join(root, MANIFEST)
        if storage.file_size(path) is None:
            raise _missing_manifest(root)
    try:
        manifest = Manifest.model_validate_json(storage.read_bytes(path))
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()[:5]
        )
        raise DataError(f"malformed {storage.display(path)}: {problems}") from e
    path = storage.display(path)
    root = manifest.root or root
    shards = [sh for sp in manifest.splits.values() for sh in sp.shards]
    if not shards:
        raise DataError(f"{path} lists no shards; rebuild the dataset")
    for split, info in manifest.splits.items():
        if sum(sh.num_samples for sh in info.shards) != info.num_samples:
            raise DataError(
                f"malformed {path}: split {split} shard sample counts do not add up to num_samples"
            )
    listed = dict(storage.list_files(root, ".tar")) if storage.is_uri(root) else None  # one listing, not a request
    for sh in shards:
        p = storage.join(root, sh.name)
        size = listed.get(sh.name) if listed is not None else storage.file_size(p)
        if size is None:
            raise DataError(f"shard {sh.name} listed in {path} is missing from {storage.display(root)}; "
                            "rebuild the dataset")
        if size != sh.bytes:
            raise DataError(f"shard {storage.display(p)} has {size} bytes, {path} says {sh.bytes}; "
                            "rebuild the dataset")
    return manifest


def _sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with storage.open_stream(str(path)) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_shards(directory: str | Path) -> Manifest:
    """Recompute every shard's sha256; raise :class:`DataError` naming the first that differs.

    Shards counted rather than written here (no recorded sha256) are checked for size only."""
    manifest = read_manifest(directory)
    for split in manifest.splits:
        for sh, path in zip(manifest.splits[split].shards, shard_paths(directory, split), strict=True):
            if sh.sha256 is None:
                continue
            got = _sha256_file(path)
            if got != sh.sha256:
                raise DataError(
                    f"shard {storage.display(path)} is corrupt: sha256 {got}, manifest says {sh.sha256}; "
                    "rebuild the dataset"
                )
    return manifest


def manifest_sha256(directory: str | Path) -> str:
    """sha256 of the manifest's bytes: the dataset's lineage id."""
    located = _manifest_file(directory)
    path = located[0] if located else storage.join(str(directory), MANIFEST)
    if storage.file_size(path) is None:
        raise DataError(f"no {MANIFEST} in {storage.display(str(directory))}")
    return hashlib.sha256(storage.read_bytes(path)).hexdigest()


def shard_paths(directory: str | Path, split: str) -> list[str]:
    """Absolute paths (or URIs) of ``split``'s shards, in manifest order."""
    located = _manifest_file(directory)
    manifest = read_manifest(directory)
    if located is not None:
        root = manifest.root or located[1]
    else:
        root = str(directory) if storage.is_uri(directory) else str(Path(directory).resolve())
    if split not in manifest.splits:
        raise DataError(f"{storage.display(root)} has no split {split!r}; splits: {', '.join(manifest.splits)}")
    return [storage.join(root, sh.name) for sh in manifest.splits[split].shards]


# ---------------------------------------------------------------- shards written elsewhere, shards in a bucket


def _absolute(root: str) -> str:
    return root.rstrip("/") if storage.is_uri(root) else str(Path(root).resolve())


def _cache_path(key: Any, cache_dir: str | Path) -> Path:
    """``cache_dir/<sha256 of key>.json``."""
    return Path(cache_dir).resolve() / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()}.json"


def _cache(manifest: Manifest, key: Any, cache_dir: str | Path) -> Path:
    """``manifest`` written as :func:`_cache_path` (atomically); its path."""
    path = _cache_path(key, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(manifest.model_dump(mode="json"), indent=2).encode("utf-8") + b"\n"
    if not path.is_file() or path.read_bytes() != data:
        _atomic_write_bytes(path, data)
    return path


def count_shards(root: str, *, image_size: int, held_out: float, tars: list[tuple[str, int]] | None = None
                 ) -> Manifest:
    """A manifest for shards without one, counted from their tar headers (and ``.cls`` members).

    Held-out split: the last ``ceil(held_out * n)`` shards in name order (at least one shard stays for
    training). Labels: ``.cls`` where present, else 0; ``num_classes`` = largest label + 1. Images are read as
    RGB, resized and cropped to ``image_size`` (``resize``).
    """
    from pipeline.data.stream import shard_index

    root = _absolute(root)
    tars = storage.list_files(root, ".tar") if tars is None else tars
    if not tars:
        raise DataError(f"{storage.display(root)} holds no *.tar shards; point data.dir at a directory (or bucket "
                        "prefix) of WebDataset shards")
    if len(tars) < 2:
        raise DataError(f"{storage.display(root)} holds only one shard ({tars[0][0]}); the held-out split is made "
                        "of whole shards (the last ceil(data.held_out x n) by name), so at least 2 are needed: "
                        "write the data into more shards")
    n_test = min(len(tars) - 1, max(1, math.ceil(held_out * len(tars))))
    splits: dict[str, SplitInfo] = {}
    num_classes = 1
    for split, part in (("train", tars[:len(tars) - n_test]), ("test", tars[len(tars) - n_test:])):
        labels: dict[int, int] = {}
        infos = []
        for name, size in part:
            index = shard_index(storage.join(root, name), with_labels=True)
            for label in index.labels:
                labels[label] = labels.get(label, 0) + 1
            infos.append(ShardInfo(name=name, num_samples=len(index.keys), sha256=None, bytes=size))
        num_classes = max(num_classes, max(labels, default=0) + 1)
        splits[split] = SplitInfo(num_samples=sum(labels.values()), labels=dict(sorted(labels.items())),
                                  shards=infos)
    log.info("counted %s: %s", storage.display(root),
             ", ".join(f"{k} {v.num_samples} samples in {len(v.shards)} shards" for k, v in splits.items()))
    return Manifest(source="webdataset", encoding="image", image_size=[image_size, image_size, 3],
                    num_classes=num_classes, held_out=held_out, splits=splits, root=root, resize=True,
                    default_label=0)


def open_dataset(directory: str, *, image_size: int | None, held_out: float,
                 cache_dir: str | Path = MANIFEST_CACHE) -> Path:
    """The name the readers take for the shards at ``directory`` (a local path or a URI).

    Our shards on local disk at their written size: ``directory`` itself. Otherwise a manifest file in
    ``cache_dir`` (on this machine, never beside the shards) whose ``root`` is ``directory``: our manifest read
    from a bucket, our shards to be resized to ``image_size``, or shards without a manifest (img2dataset's)
    counted by :func:`count_shards` (cached under the sha256 of the directory, its shards' names and sizes and
    the job's ``image_size`` and ``held_out``: a changed shard set is counted again).
    """
    root = _absolute(directory)
    if storage.file_size(storage.join(root, MANIFEST)) is not None:
        manifest = read_manifest(root)
        side = [image_size, image_size] if image_size else manifest.image_size[:2]
        resize = manifest.encoding != "npy" and side != manifest.image_size[:2]
        if not storage.is_uri(directory) and not resize:
            return Path(directory)
        relocated = manifest.model_copy(update={"root": root, "resize": manifest.resize or resize,
                                                "image_size": [*side, manifest.image_size[2]]})
        return _cache(relocated, [root, manifest_sha256(root), side], cache_dir)
    if not storage.is_dir(root):
        raise DataError(f"data.dir {storage.display(directory)} does not exist (or cannot be listed); point "
                        "data.dir at a directory or bucket prefix of shards")
    tars = storage.list_files(root, ".tar")
    if not tars or unfinished_build([n for n, _ in tars]):
        raise _missing_manifest(root)
    if image_size is None:
        raise DataError(f"{storage.display(directory)} holds {len(tars)} shard(s) without a {MANIFEST}: set "
                        "data.image_size (the side images are resized and cropped to, e.g. 256) to train on them")
    key = [root, tars, image_size, held_out]
    cached = _cache_path(key, cache_dir)
    if cached.is_file():
        try:
            Manifest.model_validate_json(cached.read_bytes())
            return cached
        except ValidationError:
            log.warning("recounting %s: its cached manifest %s is malformed", storage.display(root), cached)
    return _cache(count_shards(root, image_size=image_size, held_out=held_out, tars=tars), key, cache_dir)
