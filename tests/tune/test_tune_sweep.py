"""A small Ray Tune sweep on CPU against a real MLflow server: trials, ASHA, failures, candidate, restore."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from pipeline.config import SpecError
from pipeline.tune import load_sweep, trial_overrides

JOB = {
    "name": "tiny", "seed": 0,
    "data": {"source": "digits", "dir": "data/digits", "image_size": 16},
    "tracking": {"experiment": "tiny-sweep"},
    "eval": {"classifier": None, "num_samples": 10},
    "ray": {"num_cpus": 8, "storage": ".pipeline/ray"},
    "stages": {
        "autoencoder": {
            "kind": "autoencoder",
            "model": {"name": "kl_vae", "args": {"in_channels": 1, "base_channels": 8, "channel_mult": [1, 2],
                                                 "num_res_blocks": 1, "latent_channels": 2}},
            "objective": {"beta": 1.0e-5},
            "scale": {"workers": 1},
            "train": {"steps": 12, "batch_size": 32, "lr": 2.0e-3, "checkpoint_every": 4, "log_every": 2},
            "register": {"name": "tiny-ae", "gate": {"metric": "eval/recon_mse", "max": 10.0}},
        },
    },
}

BETA = "stages.autoencoder.objective.beta"
WORKERS = "stages.autoencoder.scale.workers"
SWEEP = {
    "name": "tiny-beta", "job": "tiny.yaml", "stage": "autoencoder",
    "metric": {"name": "eval/recon_mse", "mode": "min"},
    "search": {"algorithm": "grid", "space": {"variant": {"grid": [
        {BETA: 1.0e-6, WORKERS: 1},
        {BETA: 10.0, WORKERS: 1},
        {BETA: 1.0e-6, WORKERS: 2},  # a multi-worker trial: Ray Train with 2 workers
        {BETA: 10.0, WORKERS: 2},
        # fails at run time (no batch of this size): reported, and the sweep goes on
        {BETA: 1.0e-6, "stages.autoencoder.train.batch_size": 100000, "stages.autoencoder.scale.max_failures": 0},
    ]}}},
    "scheduler": {"kind": "asha", "metric": "train/loss", "mode": "min", "grace_period": 4, "reduction_factor": 2},
    "max_concurrent_trials": 2,
}


def _write(tmp_path: Path, sweep: dict, job: dict = JOB) -> Path:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(job))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_sweep_spec_errors_name_the_key(tmp_path):
    bad = {**SWEEP, "search": {"algorithm": "grid", "space": {"stages.autoencoder.train.stepz": {"grid": [1]}}}}
    with pytest.raises(SpecError, match=r"search\.space\.stages\.autoencoder\.train\.stepz = 1 does not give a "
                                        r"valid job(.|\n)*stages\.autoencoder\.train\.stepz: unknown key"):
        load_sweep(_write(tmp_path, bad))
    bad = {**SWEEP, "search": {"algorithm": "grid", "space": {BETA: {"uniform": [0.1, 0.2]}}}}
    with pytest.raises(SpecError, match="algorithm `grid` needs `grid:` dimensions"):
        load_sweep(_write(tmp_path, bad))
    bad = {**SWEEP, "search": {"algorithm": "random", "space": {BETA: {"loguniform": [0.0, 1.0]}}}}
    with pytest.raises(SpecError, match="positive lower bound"):
        load_sweep(_write(tmp_path, bad))
    with pytest.raises(SpecError, match=r"scheduler\.grace: unknown key"):
        load_sweep(_write(tmp_path, {**SWEEP, "scheduler": {"grace": 3}}))
    with pytest.raises(SpecError, match="'nope' is not a stage"):
        load_sweep(_write(tmp_path, {**SWEEP, "stage": "nope"}))
    in_bucket = {**JOB, "ray": {**JOB["ray"], "storage": "s3://bucket/ray"}}
    with pytest.raises(SpecError, match=r"tiny.yaml: ray.storage: s3://bucket/ray is a URI, but a sweep keeps"):
        load_sweep(_write(tmp_path, SWEEP, in_bucket))
    with pytest.raises(SpecError, match="train.steps: Input should be greater than or equal to 1"):
        load_sweep(_write(tmp_path, {**SWEEP, "search": {"space": {"g": {"grid": [
            {"stages.autoencoder.train.steps": 0}]}}}}))


def test_shipped_sweeps_validate_and_groups_expand():
    root = Path(__file__).resolve().parents[2]
    for name, stage in (("sweep.yaml", "autoencoder"), ("sweep-schedule-loss.yaml", "diffusion"),
                        ("sweep-lambda.yaml", "diffusion")):
        sweep = load_sweep(root / "jobs" / name)
        assert sweep.spec.stage == stage
    sweep = load_sweep(root / "jobs" / "sweep-schedule-loss.yaml")
    hybrid = sweep.spec.search.space["objective"].grid[1]
    spec = sweep.trial_spec({"stages.diffusion.diffusion.schedule": "linear", "objective": hybrid})
    d = spec.stages["diffusion"]
    assert (d.diffusion.schedule, d.diffusion.loss, d.diffusion.learn_sigma, d.model.args["learn_sigma"]) == (
        "linear", "hybrid", True, True)
    assert trial_overrides({"a.b": 1e-6, "g": {"c.d": "x"}}) == ["a.b=1e-06", 'c.d="x"']


@pytest.mark.slow
def test_sweep_against_mlflow_server(tmp_path, monkeypatch, shared_mlflow_server):
    import ray
    from mlflow.tracking import MlflowClient

    import mlflow
    from pipeline import tracking
    from pipeline.tune import run_sweep

    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, SWEEP)
    srv = shared_mlflow_server  # PostgreSQL-backed, shared with the other tests that need a server
    for k, v in srv.env.items():
        monkeypatch.setenv(k, v)
    try:
        result = run_sweep(load_sweep(path))
        again = run_sweep(load_sweep(path))  # a finished sweep restores (Tuner.restore) and registers nothing new
    finally:
        ray.shutdown()
    mlflow.set_tracking_uri(srv.uri)
    client = MlflowClient()

    status = [(r.config["variant"][BETA], r.config["variant"].get(WORKERS, 1), r.status) for r in result.rows]
    assert len(result.rows) == 5
    stopped = [r for r in result.rows if r.status == "stopped early"]
    completed = [r for r in result.rows if r.status == "completed"]
    failed = [r for r in result.rows if r.status == "failed"]
    assert len(stopped) >= 1, status
    assert all(r.step is not None and r.step < 12 for r in stopped)
    assert all(r.config["variant"][BETA] == 10.0 for r in stopped), status  # ASHA stops the high-β trials
    assert len(failed) == 1 and "batch_size" in str(failed[0].config) and "batch" in failed[0].error
    assert len(completed) >= 2

    # the server holds the sweep run and one child run per trial, marked by how it ended
    sweep_run = client.get_run(result.sweep_run_id)
    assert sweep_run.info.status == "FINISHED"
    exp = client.get_experiment_by_name("tiny-sweep")
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{result.sweep_run_id}'")
    assert len(children) == 5
    by_id = {r.info.run_id: r for r in children}
    for row in result.rows:
        run = by_id[row.run_id]
        want = {"completed": "FINISHED", "stopped early": "KILLED", "failed": "FAILED"}[row.status]
        assert run.info.status == want and run.data.tags["pipeline.trial_status"] == row.status
        assert run.data.params["sweep.variant"] == str(row.config["variant"])
        assert run.data.params["objective.beta"] == str(row.config["variant"][BETA])
    for row in stopped + completed:
        history = client.get_metric_history(row.run_id, "train/loss")
        steps = [m.step for m in history]
        assert steps == sorted(steps) and steps[0] == 2
        if row.status == "completed":
            assert max(steps) == 12
    for row in stopped:
        # ASHA stopped it on a report before the last step (row.step). The stop reaches the Train workers
        # asynchronously, so their MLflow history may run a few steps past it; the trial is never evaluated.
        assert "eval/recon_mse" not in by_id[row.run_id].data.metrics
    # the best completed trial, computed from the server's runs, is the registered candidate
    finished = [r for r in children if r.info.status == "FINISHED"]
    best = min(finished, key=lambda r: r.data.metrics["eval/recon_mse"])
    cand = tracking.resolve("models:/tiny-ae@candidate")
    assert result.candidate == cand.uri and cand.run_id == best.info.run_id
    assert math.isclose(result.best.metric_value, best.data.metrics["eval/recon_mse"])
    assert cand.tags["pipeline.sweep_run_id"] == result.sweep_run_id
    assert cand.tags["pipeline.trial_id"] == best.data.tags["pipeline.trial_id"]
    assert cand.tags["pipeline.spec_sha256"] and cand.tags["pipeline.data_manifest_sha256"]
    assert tracking.find_alias("tiny-ae", "champion") is None  # a sweep proposes; promotion decides
    assert "sweep_summary.md" in {a.path for a in client.list_artifacts(result.sweep_run_id)}
    assert sweep_run.data.metrics["sweep/trials_failed"] == 1.0

    # resumed: same sweep run, same candidate, no new version
    assert again.restored and again.sweep_run_id == result.sweep_run_id
    assert again.candidate == result.candidate
    assert len(client.search_model_versions("name = 'tiny-ae'")) == 1
