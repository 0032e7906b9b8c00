"""The MLflow server from mlflow/start-server.sh: auth enforced, tracking and registry work."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.servers import START_SCRIPT, ServerInfo, mlflow_server

SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url)
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _exercise(srv: ServerInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow import MlflowClient

    assert _status(srv.uri + SEARCH) == 401
    assert _status(srv.uri + SEARCH, (srv.username, "wrong-password")) == 401
    assert _status(srv.uri + SEARCH, (srv.username, srv.password)) == 200

    for k, v in srv.env.items():
        monkeypatch.setenv(k, v)
    mlflow.set_tracking_uri(srv.uri)
    try:
        client = MlflowClient()
        exp_id = client.create_experiment(f"infra-{time.time_ns()}")
        run = client.create_run(exp_id, tags={"stage": "smoke"})
        run_id = run.info.run_id
        client.log_param(run_id, "lr", "0.001")
        for step, value in enumerate([0.9, 0.5, 0.25]):
            client.log_metric(run_id, "loss", value, step=step)
        model_dir = tmp_path / "model"
        model_dir.mkdir()
        (model_dir / "weights.txt").write_text("not really weights\n")
        client.log_artifacts(run_id, str(model_dir), artifact_path="model")
        client.set_terminated(run_id)

        name = f"infra-model-{time.time_ns()}"
        client.create_registered_model(name)
        version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run_id)
        client.set_registered_model_alias(name, "candidate", version.version)

        got = client.get_run(run_id)
        assert got.data.params == {"lr": "0.001"}
        assert [m.value for m in client.get_metric_history(run_id, "loss")] == [0.9, 0.5, 0.25]
        assert got.data.metrics["loss"] == 0.25
        assert [f.path for f in client.list_artifacts(run_id, "model")] == ["model/weights.txt"]
        if srv.s3 is not None:  # the server proxied them into its bucket; its credentials are in no log
            assert any(k.endswith(f"{run_id}/artifacts/model/weights.txt") for k in srv.s3.keys()), srv.s3.keys()
            assert srv.s3.env["AWS_SECRET_ACCESS_KEY"] not in srv.log_tail(10**7)
        by_alias = client.get_model_version_by_alias(name, "candidate")
        assert by_alias.version == version.version and by_alias.run_id == run_id

        # The password is nowhere in what the server stored or reports.
        exp = client.get_experiment(exp_id)
        stored = [
            *got.data.params.values(), *got.data.tags.values(), *exp.tags.values(),
            got.info.artifact_uri, exp.artifact_location, by_alias.source,
            srv.uri, mlflow.get_tracking_uri(), srv.backend_store_uri,
        ]  # fmt: skip
        assert not [s for s in stored if srv.password in str(s)]
        assert srv.password not in srv.log_tail(10**7)
    finally:
        mlflow.set_tracking_uri(None)


def test_start_script_refuses_without_credentials(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_HOME"] = str(tmp_path)
    env["MLFLOW_BIN"] = str(Path(sys.executable).with_name("mlflow"))
    out = subprocess.run(["bash", str(START_SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in out.stderr
    env["MLFLOW_AUTH_ADMIN_PASSWORD"] = "x" * 16
    out = subprocess.run(["bash", str(START_SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY" in out.stderr
    env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = "k" * 32
    env["MLFLOW_BACKEND_STORE_URI"] = "postgresql://u:hunter2@127.0.0.1:5432/mlflow"
    out = subprocess.run(["bash", str(START_SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "PGPASSWORD" in out.stderr and "hunter2" not in out.stderr


def _check_server(srv: ServerInfo, scheme: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert srv.uri.startswith("http://127.0.0.1:")
    assert srv.backend_store_uri.startswith(scheme)
    try:
        _exercise(srv, tmp_path, monkeypatch)
    except Exception:
        print(srv.log_tail())
        raise


@pytest.mark.slow
def test_server_auth_tracking_and_registry_on_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with mlflow_server(tmp_path, backend="sqlite") as srv:
        _check_server(srv, "sqlite:///", tmp_path, monkeypatch)


@pytest.mark.slow
def test_server_auth_tracking_and_registry_on_postgres(shared_mlflow_server: ServerInfo, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert shared_mlflow_server.s3 is not None  # the run's shared server: PostgreSQL, artifacts in S3
    _check_server(shared_mlflow_server, "postgresql://", tmp_path, monkeypatch)
