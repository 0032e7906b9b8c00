"""jobs/tdvae.yaml end to end, shrunk: moving-digits shards, Ray Train + DeepSpeed, MLflow run and registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.helpers import run_job

# Shrunk from 3000 steps; the gate stays a real bar: held-out 1-step-ahead prediction MSE below 0.24, where
# repeating the last observed frame scores ~0.28 and the mean held-out frame ~0.19 (jobs/tdvae.yaml).
TINY = ["stages.tdvae.train.steps=300", "stages.tdvae.train.checkpoint_every=150", "stages.tdvae.train.log_every=50",
        "stages.tdvae.scale.workers=1", "stages.tdvae.objective.eval_samples=4",
        "stages.tdvae.register.gate.max=0.24"]
GATE = 0.24


@pytest.mark.slow
def test_tdvae_job_end_to_end(tmp_path: Path) -> None:
    proc = run_job(tmp_path, "tdvae.yaml", TINY, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from mlflow.tracking import MlflowClient

    import mlflow
    from pipeline.data import read_manifest

    manifest = read_manifest(tmp_path / "data" / "moving-digits")
    assert manifest.source == "moving-digits" and manifest.image_size == [16, 16 * 12, 1]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    mv = client.get_model_version_by_alias("tdvae-moving-digits", "champion")
    run = client.get_run(mv.run_id)
    m = run.data.metrics
    print({k: round(v, 4) for k, v in sorted(m.items()) if k.startswith("eval/")})
    assert m["eval/pred_mse_k1"] <= GATE  # promoted, so it passed its gate
    # jumpy prediction beats repeating the last observed frame at every horizon, and on average by a margin
    # (measured: k=1 0.184 against 0.282; mean over k 0.201 against 0.365)
    for k in range(1, 6):
        assert m[f"eval/pred_mse_k{k}"] < m[f"eval/repeat_last_mse_k{k}"], (k, m)
    assert m["eval/pred_mse"] < 0.85 * m["eval/repeat_last_mse"], m
    assert m["eval/context_frames"] == 7 and "train/loss" in m
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/rollouts.png", "samples/filter_reconstructions.png"} <= artifacts

    from pipeline import tracking
    from pipeline.train.export import load_exported

    model, meta = load_exported(tracking.download(tracking.resolve("models:/tdvae-moving-digits@champion")))
    assert meta["name"] == "td_vae" and model.frames == 12 and model.max_jump == 4
