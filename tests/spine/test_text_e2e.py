"""Text-conditioned latent diffusion (jobs/ldm-text.yaml) end to end, shrunk: real Ray, DeepSpeed, MLflow, shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.helpers import clean_env, run_job

TINY = [
    "eval.num_samples=20",
    "stages.autoencoder.train.steps=20", "stages.autoencoder.train.checkpoint_every=20",
    "stages.autoencoder.register.gate.max=1.0",
    "stages.classifier.train.steps=20", "stages.classifier.train.checkpoint_every=20",
    "stages.classifier.register.gate.min=0.0",
    "stages.diffusion.train.steps=20", "stages.diffusion.train.checkpoint_every=20",
    "stages.diffusion.train.log_every=10", "stages.diffusion.train.batch_size=64",
    "stages.diffusion.sampling.steps=3", "stages.diffusion.register.gate.min=0.0",
]


@pytest.mark.slow
def test_ldm_text_job_end_to_end(tmp_path):
    run = run_job(tmp_path, "ldm-text.yaml", TINY, env=clean_env(HF_HUB_OFFLINE="1"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    from mlflow.tracking import MlflowClient

    import mlflow
    from pipeline import tracking
    from pipeline.eval.text import generate_from_captions
    from pipeline.stages import load_generator

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    mv = client.get_model_version_by_alias("ldm-text", "champion")
    ae = client.get_model_version_by_alias("ldm-autoencoder", "champion")
    assert mv.tags["pipeline.input.autoencoder"] == f"models:/ldm-autoencoder/{ae.version}"
    run_ = client.get_run(mv.run_id)
    assert run_.data.params["conditioning"] == "text" and run_.data.params["text_encoder.name"] == "trainable"
    assert {"eval/class_accuracy", "eval/fid", "eval/kid", "train/loss"} <= set(run_.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(mv.run_id, "samples")}
    assert {"samples/grid.png", "samples/grid_captions.txt"} <= artifacts
    rows = client.download_artifacts(mv.run_id, "samples/grid_captions.txt", str(tmp_path))
    assert "handwritten" in Path(rows).read_text() or "digit" in Path(rows).read_text()

    # the registered version rebuilds with its text encoder (vocabulary included) and samples from captions
    gen = load_generator(tracking.download(tracking.resolve("models:/ldm-text@champion")))
    assert gen.meta["name"] == "text_conditioned" and gen.extra["conditioning"] == "text"
    assert "three" in gen.meta["args"]["text_encoder"]["args"]["vocab"]
    x = generate_from_captions(gen, ["a handwritten digit three", "a handwritten digit seven"], steps=2, seed=0)
    assert x.shape == (2, 1, 16, 16) and x.isfinite().all()
