"""Session-wide hygiene for tests that start Ray in this process.

Ray 2.60 caches its authentication mode per process (RayConfig and the token loader) and sets
RAY_AUTH_MODE in os.environ on a first local `ray.init()`. Tests that start Ray with different
auth settings one after another then disagree with their own GCS ("InvalidAuthToken"). After each
test: shut Ray down, put the RAY_AUTH_* variables back as they were, and reset Ray's cached state.
"""

from __future__ import annotations

import os
import sys

import pytest

# Every test's Ray runs on this one machine, where no node can be preempted: no preemption watcher, as
# `pipeline run` starts in-process Ray (an actor and ~1 s of CPU less per fit).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


@pytest.fixture(autouse=True)
def _isolated_ray_state():
    before = {k: os.environ.get(k) for k in _AUTH_VARS}
    yield
    if "ray" not in sys.modules:
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        from ray._private.authentication_test_utils import reset_auth_token_state
    except ImportError:  # a Ray without the helper: nothing cached to reset
        return
    reset_auth_token_state()


@pytest.fixture(scope="session")
def shared_mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """One authenticated MLflow tracking server on PostgreSQL, its artifacts in an S3-compatible store (moto's
    server mode on 127.0.0.1), for the whole test run (started on first use).

    Tests that only need *a* server share it: each uses its own experiment and registered-model names, and
    sets the server's client environment with ``monkeypatch.setenv`` for each item of ``srv.env``.
    """
    from tests.servers import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("shared-mlflow"), backend="postgres", artifacts="s3") as srv:
        yield srv
