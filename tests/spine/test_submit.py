"""Cluster submission: a real head started with `ray start --head` on 127.0.0.1, a job submitted two ways."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop the head (and everything of its process group)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:  # `ray start --block` rarely exits on SIGTERM within 30 s (it cost every run 30 s): 5 s, then SIGKILL
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture()
def ray_head(tmp_path):
    """A head node in its own process group (stopped by pid, never by `ray stop`)."""
    gcs, dash = _free_port(), _free_port()
    # Token auth on, as in production, with a token of this test's own (never ~/.ray/auth_token).
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    # Its own temp dir: jobs find their cluster through <temp dir>/ray_current_cluster, which a
    # head started elsewhere on this machine would otherwise overwrite.
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    log = open(tmp_path / "head.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=8", "--include-dashboard=true",
         "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            out = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                                 capture_output=True, text=True)
            if out.returncode == 0:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"ray head exited: {(tmp_path / 'head.log').read_text()[-2000:]}")
            time.sleep(2)
        else:
            raise RuntimeError("ray head did not become ready in 120 s")
        yield address, env, lambda: _stop(proc)
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_job_submitted_with_ray_cli_and_with_pipeline_submit(ray_head, tmp_path):
    """Both ways of submitting; the runs and the champion outlive the head; a job whose embedded MLflow store
    would live in Ray's temporary working directory is refused before any work."""
    address, env, stop_head = ray_head
    lost = subprocess.run(  # no MLFLOW_TRACKING_URI: the default store would be inside Ray's copy of the job
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
         "python", "-m", "pipeline", "run", "jobs/smoke.yaml"],
        cwd=ROOT, env={k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}, capture_output=True, text=True,
        timeout=600)
    assert lost.returncode != 0
    assert "runs in Ray's temporary copy of its working directory" in lost.stdout, lost.stdout[-3000:]
    assert "Point MLFLOW_TRACKING_URI (or tracking.uri) at a tracking server" in lost.stdout
    assert "[classifier] training" not in lost.stdout

    db = tmp_path / "mlflow.db"
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"]}})
    first = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
         "--runtime-env-json", runtime_env, "--", "python", "-m", "pipeline", "run", "jobs/smoke.yaml"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "[classifier] training" in first.stdout
    assert "registered smoke-classifier v1 → champion" in first.stdout

    second = subprocess.run(
        [sys.executable, "-m", "pipeline", "submit", "jobs/smoke.yaml", "--address", address],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "[classifier] skipped" in second.stdout  # same spec, same store: the champion is reused
    assert "SUCCEEDED" in second.stdout

    stop_head()  # the cluster goes away; what the jobs registered stays
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    assert str(client.get_model_version_by_alias("smoke-classifier", "champion").version) == "1"
