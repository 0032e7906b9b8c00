"""jobs/unclip.yaml end to end, shrunk: classifier → CLIP → prior → decoder with real Ray, DeepSpeed, MLflow, shards;
then text → image through the registered models (eq. 49)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.helpers import run_job, run_pipeline

TINY = [
    "eval.num_samples=20",
    "stages.classifier.train.steps=20", "stages.classifier.train.checkpoint_every=20",
    "stages.classifier.register.gate.min=0.0",
    "stages.clip.train.steps=20", "stages.clip.train.checkpoint_every=20", "stages.clip.register.gate.min=0.0",
    "stages.prior.train.steps=20", "stages.prior.train.checkpoint_every=20", "stages.prior.sampling.steps=3",
    "stages.prior.register.gate.min=0.0",
    "stages.decoder.train.steps=10", "stages.decoder.train.checkpoint_every=10", "stages.decoder.train.batch_size=32",
    "stages.decoder.sampling.steps=2", "stages.decoder.register.gate.min=0.0",
]
NAMES = {"classifier": "unclip-classifier", "clip": "unclip-clip", "prior": "unclip-prior", "decoder": "unclip-decoder"}


@pytest.mark.slow
@pytest.mark.e2e_suite
def test_unclip_job_registers_every_stage_and_samples_text_to_image(tmp_path):
    run = run_job(tmp_path, "unclip.yaml", TINY)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    from mlflow.tracking import MlflowClient

    import mlflow
    from pipeline import tracking
    from pipeline.eval.unclip import text_to_image
    from pipeline.train.export import load_exported

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    versions = {stage: client.get_model_version_by_alias(name, "champion") for stage, name in NAMES.items()}
    for stage, mv in versions.items():
        assert client.get_run(mv.run_id).data.tags["pipeline.stage"] == stage
    clip_uri = f"models:/unclip-clip/{versions['clip'].version}"
    assert versions["prior"].tags["pipeline.input.clip"] == clip_uri
    assert versions["decoder"].tags["pipeline.input.clip"] == clip_uri
    assert versions["decoder"].tags["pipeline.input.prior"] == f"models:/unclip-prior/{versions['prior'].version}"

    clip_metrics = client.get_run(versions["clip"].run_id).data.metrics
    assert 0.0 <= clip_metrics["eval/zero_shot_accuracy"] <= 1.0 and "train/loss" in clip_metrics
    prior_metrics = client.get_run(versions["prior"].run_id).data.metrics
    assert -1.0 <= prior_metrics["eval/cosine_to_true"] <= 1.0 and "eval/unguided_zero_shot_accuracy" in prior_metrics
    decoder_run = versions["decoder"].run_id
    metrics = client.get_run(decoder_run).data.metrics
    for key in ("eval/class_accuracy", "eval/unguided_class_accuracy", "eval/reconstruction_class_accuracy",
                "eval/fid", "eval/clip_similarity"):
        assert key in metrics, key
    artifacts = {a.path for a in client.list_artifacts(decoder_run, "samples")}
    assert {"samples/grid.png", "samples/grid_captions.txt", "samples/variations_grid.png"} <= artifacts
    grid = Path(client.download_artifacts(decoder_run, "samples/grid.png", str(tmp_path)))
    from PIL import Image

    assert Image.open(grid).size == ((8 * 17 + 1) * 4, (10 * 17 + 1) * 4)  # 10 caption rows of 8 samples, 16×16

    # the registered models sample text → image on their own (the decoder records its CLIP and prior)
    decoder, meta = load_exported(tracking.download(tracking.resolve("models:/unclip-decoder@champion")))
    assert meta["extra"]["prior_sampling"]["steps"] == 3  # the prior stage's sampling settings travel along
    clip, _ = load_exported(tracking.download(tracking.resolve(meta["extra"]["clip"])))
    prior, prior_meta = load_exported(tracking.download(tracking.resolve(meta["extra"]["prior"])))
    x, emb = text_to_image(clip, prior, prior_meta, decoder, meta, ["a handwritten digit seven", "a handwritten two"],
                           prior_kw={"steps": 2, "guidance": 1.0}, decoder_kw={"steps": 2, "guidance": 1.0})
    assert x.shape == (2, 1, 16, 16) and x.isfinite().all() and emb.shape == (2, 32)
    sample = run_pipeline(tmp_path, "sample", "models:/unclip-decoder@champion",
                          "--caption", "a handwritten digit three", "--caption", "a handwritten seven",
                          "--num", "2", "--steps", "2", "--guidance", "1", "--out", "cli.png")
    assert sample.returncode == 0, sample.stdout[-2000:] + sample.stderr[-2000:]
    assert Image.open(tmp_path / "cli.png").size == ((2 * 17 + 1) * 4, (2 * 17 + 1) * 4)  # 2 captions × 2 samples
