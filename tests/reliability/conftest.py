"""Fixtures of the reliability tests (helpers live in tests/reliability/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data import build_dataset


@pytest.fixture(scope="session")
def digits8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits at 8x8 in two train shards. Read-only: copy before corrupting."""
    out = tmp_path_factory.mktemp("rel-digits") / "digits"
    build_dataset("digits", out, image_size=8, shard_size=800, seed=0)
    return out


@pytest.fixture()
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory and a clean environment (restored afterwards)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    for key in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):  # tracking.connect sets these
        monkeypatch.setenv(key, "2" if key.endswith("TIMEOUT") else "0")
    return work
