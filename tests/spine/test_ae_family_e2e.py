"""The classic-autoencoder job files end to end, shrunk: real Ray, DeepSpeed, MLflow registry, digits shards.

One `pipeline run jobs/vae.yaml` with a second stage (the k-sparse AE of jobs/ksparse.yaml) added by --set,
so one Ray session trains two objectives; both must be registered as champions and beat the mean image.
"""

from __future__ import annotations

import pytest
import yaml

from tests.reliability.helpers import ROOT, run_job


@pytest.mark.slow
def test_vae_and_ksparse_jobs_register_champions_that_beat_the_mean_image(tmp_path):
    ksparse = yaml.safe_load((ROOT / "jobs" / "ksparse.yaml").read_text())["stages"]["autoencoder"]
    ksparse["train"].update(steps=400, checkpoint_every=200, log_every=100)
    ksparse["objective"]["anneal_steps"] = 200
    overrides = [
        "stages.autoencoder.train.steps=400", "stages.autoencoder.train.checkpoint_every=200",
        "stages.autoencoder.objective.iw_samples=16",
        f"stages.ksparse={yaml.safe_dump(ksparse, default_flow_style=True, width=10_000).strip()}",
    ]
    out = run_job(tmp_path, "vae.yaml", overrides)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    from mlflow.tracking import MlflowClient

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    for name, stage in (("vae-digits", "autoencoder"), ("ksparse-digits", "ksparse")):
        mv = client.get_model_version_by_alias(name, "champion")
        run = client.get_run(mv.run_id)
        assert run.data.tags["pipeline.stage"] == stage
        m = run.data.metrics
        assert m["eval/recon_mse"] < 0.5 * m["eval/mean_image_mse"], m  # the gate: recon_ratio <= 0.5
        assert m["eval/recon_ratio"] == pytest.approx(m["eval/recon_mse"] / m["eval/mean_image_mse"])
        artifacts = {a.path for a in client.list_artifacts(mv.run_id, "samples")}
        assert "samples/reconstructions.png" in artifacts
        if stage == "autoencoder":
            assert {"samples/prior_samples.png", "samples/traversals.png"} <= artifacts
            assert 0 < m["eval/nll_iw"] <= m["eval/neg_elbo"] + 0.5  # nats per image; the IW bound is tighter
            assert m["eval/neg_elbo_bpd"] > 0 and m["eval/kl"] > 0
        else:
            assert "samples/filters.png" in artifacts
            assert m["eval/frac_near_zero"] >= 1 - 25 / 100  # at most k = 25 of 100 units active
