"""jobs/vqvae2.yaml end to end, shrunk: VQ-VAE-2 → classifier → PixelCNN prior stage, on real Ray / DeepSpeed /
MLflow / shards. Checks the registry (autoencoder and prior versions, champions, lineage) and the logged images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

TINY = [
    "eval.num_samples=20",
    "stages.autoencoder.train.steps=30", "stages.autoencoder.train.checkpoint_every=30",
    "stages.autoencoder.train.log_every=10", "stages.autoencoder.register.gate.max=100.0",
    "stages.autoencoder.model.args.base_channels=16",
    "stages.classifier.train.steps=20", "stages.classifier.register.gate.min=0.0",
    "stages.prior.train.steps=20", "stages.prior.train.checkpoint_every=20", "stages.prior.train.log_every=10",
    "stages.prior.model.args={channels: 16, num_layers: 3, kernel_size: 3}",
    "stages.prior.sampling.num_samples=20", "stages.prior.register.gate.min=0.0",
]


@pytest.mark.slow
def test_vqvae2_job_registers_autoencoder_and_prior_with_sample_grid(tmp_path):
    args = [sys.executable, "-m", "pipeline", "run", str(ROOT / "jobs" / "vqvae2.yaml")]
    for item in TINY:
        args += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    from mlflow.tracking import MlflowClient

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    ae = client.get_model_version_by_alias("vqvae2-autoencoder", "champion")
    prior = client.get_model_version_by_alias("vqvae2-prior", "champion")
    assert prior.tags["pipeline.input.autoencoder"] == f"models:/vqvae2-autoencoder/{ae.version}"

    runs = {r.data.tags.get("pipeline.stage"): r for r in client.search_runs(
        [client.get_experiment_by_name("vqvae2").experiment_id])}
    ae_run, prior_run = runs["autoencoder"], runs["prior"]
    for key in ("eval/recon_mse", "eval/mean_image_mse", "eval/perplexity_top", "eval/perplexity_bottom",
                "eval/code_usage", "eval/vq_check"):
        assert key in ae_run.data.metrics, key
    assert 1.0 <= ae_run.data.metrics["eval/perplexity_bottom"] <= 64
    for key in ("eval/bits_per_code", "eval/bits_per_code_top", "eval/bits_per_code_bottom",
                "eval/bits_per_code_unigram", "eval/class_accuracy", "eval/fid", "train/bits_per_code"):
        assert key in prior_run.data.metrics, key
    assert 0 < prior_run.data.metrics["eval/bits_per_code"] < 7  # below log2(64) + slack: it learnt something
    assert {a.path for a in client.list_artifacts(ae_run.info.run_id, "samples")} == {
        "samples/reconstructions.png"}
    assert "samples/grid.png" in {a.path for a in client.list_artifacts(prior_run.info.run_id, "samples")}

    # the exported autoencoder keeps its codebook buffers (EMA of weights, export, registry)
    from pipeline import tracking
    from pipeline.train.export import load_exported

    model, _ = load_exported(tracking.download(tracking.resolve(f"models:/vqvae2-autoencoder/{ae.version}")))
    q = model.quantizers[1]
    assert int(q.initialized) == 1 and q.codebook.std() > 0
