"""A user error raised inside a Ray Train worker (a corrupt tar member read by a Ray Data task there)
reaches the user as one clean message with exit code 2, and nothing is registered."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.data.shards import read_manifest
from tests.reliability.helpers import corrupt_member, run_pipeline, write_job

pytestmark = pytest.mark.slow


def test_corrupt_member_in_a_training_worker_is_one_clean_error(tmp_path: Path, digits8: Path) -> None:
    data = tmp_path / "digits"
    shutil.copytree(digits8, data)
    shard = data / read_manifest(data).splits["train"].shards[1].name
    member = corrupt_member(shard, index=5)
    job = write_job(tmp_path / "job.yaml", data)

    out = run_pipeline(tmp_path, "run", str(job), timeout=600)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    err_lines = [ln for ln in lines if ln.startswith("error: ")]
    assert len(err_lines) == 1 and lines[-1] == err_lines[0], out.stderr[-3000:]  # one message, the last line
    # the driver did not crash: no traceback through the pipeline's own driver code (lines Ray itself
    # logged from its workers, e.g. a slow-machine warning, may precede the message)
    assert 'pipeline/cli.py", line' not in out.stdout + out.stderr, out.stderr[-3000:]
    err = err_lines[0]
    assert err.startswith(f"error: stage 'classifier': corrupt member {member} in shard {shard}: ")
    assert err.endswith("— set data.on_corrupt=skip to skip and count such samples, or rebuild the shards "
                        "(`pipeline data build`)")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_registered_models() == []  # nothing half-registered
    runs = client.search_runs([client.get_experiment_by_name("rel").experiment_id])
    assert {r.data.tags.get("pipeline.stage", "(job)"): r.info.status for r in runs} == {
        "(job)": "FAILED", "classifier": "FAILED"}
