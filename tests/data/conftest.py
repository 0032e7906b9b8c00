"""Fixtures for the data-layer tests: small datasets built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data import build_dataset


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled digits at 8x8, several shards per split. Treat as read-only."""
    out = tmp_path_factory.mktemp("digits") / "ds"
    build_dataset("digits", out, image_size=8, shard_size=300, seed=0)
    return out
