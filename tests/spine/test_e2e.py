"""The main job end to end, shrunk: real Ray (in-process), real DeepSpeed, real MLflow store, real shards."""

from __future__ import annotations

import pytest

from tests.reliability.helpers import run_job, run_pipeline

TINY = [
    "eval.num_samples=40",
    "stages.autoencoder.train.steps=40", "stages.autoencoder.train.checkpoint_every=20",
    "stages.autoencoder.register.gate.max=1.0",
    "stages.classifier.train.steps=40", "stages.classifier.register.gate.min=0.0",
    "stages.diffusion.train.steps=30", "stages.diffusion.train.checkpoint_every=30",
    "stages.diffusion.train.log_every=10",
    "stages.diffusion.sampling.steps=4", "stages.diffusion.register.gate.min=0.0",
    "stages.distill.teacher_steps=4", "stages.distill.halvings=1", "stages.distill.train.steps=10",
    "stages.distill.register.gate.min=0.0",
]


@pytest.mark.slow
def test_ldm_job_end_to_end_then_skips_on_rerun(tmp_path):
    first = run_job(tmp_path, "ldm.yaml", TINY, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Registered models (alias champion)" in first.stdout
    assert (tmp_path / "data" / "digits" / "manifest.json").is_file()

    from mlflow.tracking import MlflowClient

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    versions = {}
    for name in ("ldm-autoencoder", "ldm-classifier", "ldm", "ldm-distilled"):
        mv = client.get_model_version_by_alias(name, "champion")
        versions[name] = mv.version
        assert mv.tags["pipeline.stage_key"]
        assert mv.source.startswith("runs:/")
    # downstream stages record exactly which input versions they used
    ldm = client.get_model_version_by_alias("ldm", "champion")
    assert ldm.tags["pipeline.input.autoencoder"] == f"models:/ldm-autoencoder/{versions['ldm-autoencoder']}"
    distilled = client.get_model_version_by_alias("ldm-distilled", "champion")
    assert distilled.tags["pipeline.input.diffusion"] == f"models:/ldm/{versions['ldm']}"

    exp = client.get_experiment_by_name("ldm")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    assert {r.data.tags["pipeline.stage"] for r in children} == {"autoencoder", "classifier", "diffusion",
                                                                "distill"}
    diffusion_run = next(r for r in children if r.data.tags["pipeline.stage"] == "diffusion")
    assert "train/loss" in diffusion_run.data.metrics
    history = client.get_metric_history(diffusion_run.info.run_id, "train/loss")
    assert len(history) >= 2 and sorted(m.step for m in history) == [m.step for m in history]
    assert diffusion_run.data.params["train.steps"] == "30"
    artifacts = {a.path for a in client.list_artifacts(diffusion_run.info.run_id, "samples")}
    assert "samples/grid.png" in artifacts
    assert {"eval/class_accuracy", "eval/fid", "eval/kid"} <= set(diffusion_run.data.metrics)
    distill_run = next(r for r in children if r.data.tags["pipeline.stage"] == "distill")
    assert {"eval/teacher_4steps_class_accuracy", "eval/student_2steps_class_accuracy"} <= set(
        distill_run.data.metrics)

    second = run_job(tmp_path, "ldm.yaml", TINY, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for stage in ("autoencoder", "classifier", "diffusion", "distill"):
        assert f"[{stage}] skipped" in second.stdout
    assert "already cached" in second.stdout
    for name, version in versions.items():
        assert client.get_model_version_by_alias(name, "champion").version == version

    grid = tmp_path / "grid.png"
    out = run_pipeline(tmp_path, "sample", "models:/ldm-distilled@champion", "--label", "3", "--num", "8",
                       "--out", str(grid))
    assert out.returncode == 0, out.stderr[-2000:]
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    missing = run_pipeline(tmp_path, "sample", "models:/ldm@nosuchalias", "--out", str(grid))
    assert missing.returncode == 2
    assert "nosuchalias" in missing.stderr and "Traceback" not in missing.stderr
