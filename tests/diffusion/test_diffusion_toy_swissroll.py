"""`pipeline toy swissroll`: trains the Swiss-roll MLP DDPM and logs metrics and a scatter plot to MLflow."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from pipeline.cli import main


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # the default artifact root (./mlruns) lands in tmp_path
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous = mlflow.get_tracking_uri()
    yield f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(previous)


def _only_run(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def test_swissroll_command_logs_metrics_and_plot(mlflow_store, capsys):
    rc = main(["toy", "swissroll", "--steps", "150", "--timesteps", "100", "--num-samples", "400",
               "--nll-points", "100", "--sample-steps", "10", "--tracking-uri", mlflow_store,
               "--experiment", "sr-test"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "ancestral_100" in out and "bits/dim" in out
    client, run = _only_run(mlflow_store, "sr-test")
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    for key in ("sw/ancestral_100", "sw/strided_10", "sw/ddim_10", "sw/data_vs_data", "sw/gaussian",
                "bits_per_dim", "gaussian_bits_per_dim", "train/loss", "train_seconds"):
        assert key in m and math.isfinite(m[key]), key
    assert m["sw/data_vs_data"] < m["sw/gaussian"]
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 2
    assert run.data.params["parameterization"] == "eps" and run.data.params["timesteps"] == "100"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["swissroll.png"]
    png = client.download_artifacts(run.info.run_id, "swissroll.png")
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 3 * img.height  # data + three sampler panels side by side


def test_swissroll_flags_reach_the_experiment(mlflow_store):
    rc = main(["toy", "swissroll", "--steps", "40", "--schedule", "cosine", "--timesteps", "50",
               "--parameterization", "v", "--loss", "hybrid", "--lambda-vlb", "0.01", "--learn-sigma",
               "--sampler", "ddim", "--sampler", "langevin", "--langevin-steps", "2", "--langevin-step-ratio", "0.3",
               "--sample-steps", "5", "--eta", "0.5", "--num-samples", "200",
               "--nll-points", "50", "--tracking-uri", mlflow_store, "--experiment", "sr-flags"])
    assert rc == 0
    _, run = _only_run(mlflow_store, "sr-flags")
    p = run.data.params
    assert (p["schedule"], p["parameterization"], p["loss"], p["learn_sigma"], p["samplers"], p["eta"]) == (
        "cosine", "v", "hybrid", "True", "ddim,langevin", "0.5")
    assert (p["langevin_steps"], p["langevin_step_ratio"]) == ("2", "0.3")
    assert "sw/ddim_5" in run.data.metrics and "sw/ancestral_50" not in run.data.metrics
    assert math.isfinite(run.data.metrics["sw/langevin_5"])
    assert math.isfinite(run.data.metrics["bits_per_dim"])
