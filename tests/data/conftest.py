"""Fixtures for the data-layer tests: small datasets built once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.data import build_dataset
from pipeline.data.sources import Sample


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled digits at 8x8, several shards per split. Treat as read-only."""
    out = tmp_path_factory.mktemp("digits") / "ds"
    build_dataset("digits", out, image_size=8, shard_size=300, seed=0)
    return out


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
