"""Helpers shared by the data-layer tests (a uniquely named module, importable from tests/data)."""

from __future__ import annotations

import numpy as np

from pipeline.data.sources import Sample


def make_samples(n: int, *, channels: int = 3, size: int = 8, seed: int = 0) -> list[Sample]:
    """Random synthetic samples with distinct keys, labels 0..4 and unicode captions."""
    rng = np.random.default_rng(seed)
    return [
        Sample(
            key=f"s-{i:04d}",
            image=rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8),
            label=i % 5,
            caption=f"sample {i} – ünïcode",
            extra={"i": i} if i % 2 else {},
        )
        for i in range(n)
    ]


class MakesDir:
    """Unpickling this creates a directory: a visible side effect, harmless otherwise."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))


def write_raw_tar(path, samples: list[dict[str, bytes]]) -> None:
    """Write ``[{"__key__": key, ext: bytes, ...}]`` as a plain ustar tar."""
    import io
    import tarfile

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            for ext in sorted(k for k in s if k != "__key__"):
                ti = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                ti.size = len(s[ext])
                tf.addfile(ti, io.BytesIO(s[ext]))


def refresh_manifest(directory, name: str) -> None:
    """Record shard ``name``'s current size and sha256 in the manifest (after a deliberate edit)."""
    import hashlib
    import json

    from pipeline.data.shards import Manifest, write_manifest

    data = (directory / name).read_bytes()
    raw = json.loads((directory / "manifest.json").read_text())
    for split in raw["splits"].values():
        for sh in split["shards"]:
            if sh["name"] == name:
                sh["bytes"], sh["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    write_manifest(directory, Manifest.model_validate(raw))
