"""jobs/distill.yaml end to end, shrunk: teacher with classifier guidance, progressive distillation, consistency
distillation and training, then the `bench generation` table from the registered models; and jobs/dit.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.reliability.helpers import ROOT, run_job, run_pipeline

TINY = [
    "eval.num_samples=20",
    "stages.autoencoder.train.steps=20", "stages.autoencoder.train.checkpoint_every=20",
    "stages.autoencoder.register.gate.max=1.0",
    "stages.classifier.train.steps=20", "stages.classifier.register.gate.min=0.0",
    "stages.noisy_classifier.train.steps=10", "stages.noisy_classifier.register.gate.min=0.0",
    "stages.diffusion.train.steps=20", "stages.diffusion.train.checkpoint_every=20",
    "stages.diffusion.sampling.steps=4", "stages.diffusion.register.gate.min=0.0",
    "stages.distill.teacher_steps=4", "stages.distill.halvings=2", "stages.distill.train.steps=5",
    "stages.distill.register.gate.min=0.0",
    "stages.consistency_distill.levels=6", "stages.consistency_distill.train.steps=5",
    "stages.consistency_distill.register.gate.min=0.0",
    "stages.consistency_train.levels=6", "stages.consistency_train.train.steps=5",
    "stages.consistency_train.register.gate.min=0.0",
]

DIT_TINY = [
    "eval.num_samples=20",
    "stages.autoencoder.train.steps=20", "stages.autoencoder.train.checkpoint_every=20",
    "stages.autoencoder.register.gate.max=1.0",
    "stages.classifier.train.steps=20", "stages.classifier.register.gate.min=0.0",
    "stages.diffusion.train.steps=10", "stages.diffusion.train.checkpoint_every=10",
    "stages.diffusion.sampling.steps=2", "stages.diffusion.register.gate.min=0.0",
]


@pytest.mark.slow
@pytest.mark.e2e_suite
def test_distill_job_registers_every_generator_and_bench_tables_them(tmp_path):
    job = ROOT / "jobs" / "distill.yaml"
    sets = [a for s in TINY for a in ("--set", s)]
    run = run_job(tmp_path, "distill.yaml", TINY)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    from mlflow.tracking import MlflowClient

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    grids = {"diffusion": ["grid.png"],
             "distill": ["teacher_4steps_grid.png", "student_2steps_grid.png", "student_1steps_grid.png"],
             "consistency_distill": ["1step_grid.png", "2step_grid.png"],
             "consistency_train": ["1step_grid.png", "2step_grid.png"]}
    for stage in ("autoencoder", "classifier", "noisy_classifier", *grids):
        name = {"diffusion": "distill-teacher", "distill": "distill-progressive",
                "consistency_distill": "distill-consistency-cd", "consistency_train": "distill-consistency-ct",
                "noisy_classifier": "distill-noisy-classifier"}.get(stage, f"distill-{stage}")
        mv = client.get_model_version_by_alias(name, "champion")
        run_tags = client.get_run(mv.run_id).data.tags
        assert run_tags["pipeline.stage"] == stage
        artifacts = {Path(a.path).name for a in client.list_artifacts(mv.run_id, "samples")}
        assert set(grids.get(stage, [])) <= artifacts, (stage, artifacts)
    cd = client.get_model_version_by_alias("distill-consistency-cd", "champion")
    assert cd.tags["pipeline.input.diffusion"].startswith("models:/distill-teacher/")
    metrics = client.get_run(cd.run_id).data.metrics
    assert 0.0 <= metrics["eval/1step_class_accuracy"] <= 1.0 and "eval/2step_fid" in metrics
    teacher = client.get_model_version_by_alias("distill-teacher", "champion")
    assert "eval/class_accuracy" in client.get_run(teacher.run_id).data.metrics  # with classifier guidance

    out = tmp_path / "generation.json"
    bench = run_pipeline(tmp_path, "bench", "generation", str(job), *sets, "--num", "20", "--teacher-steps", "4,2",
                         "--cfg", "0", "--cg-scales", "1", "--json", str(out), timeout=1200)
    assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    models = [r["model"] for r in rows]
    assert any("consistency distillation" in m for m in models) and any("consistency training" in m for m in models)
    progressive = {r["steps"]: r["source"] for r in rows if "progressive" in r["model"]}
    assert progressive.keys() == {1, 2} and progressive[2].startswith("logged")  # 2 steps: the first halving
    assert any(r["sampler"] == "DDIM + classifier guidance" for r in rows)
    assert all(0.0 <= r["class acc"] <= 1.0 for r in rows)
    assert "| model |" in bench.stdout


@pytest.mark.slow
@pytest.mark.e2e_suite
def test_dit_job_registers_a_class_conditional_dit_on_the_latents(tmp_path):
    run = run_job(tmp_path, "dit.yaml", DIT_TINY)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("dit-autoencoder", "dit-classifier"):
        client.get_model_version_by_alias(name, "champion")
    mv = client.get_model_version_by_alias("dit", "champion")
    assert mv.tags["pipeline.input.autoencoder"].startswith("models:/dit-autoencoder/")  # through encode
    assert "grid.png" in {Path(a.path).name for a in client.list_artifacts(mv.run_id, "samples")}
    metrics = client.get_run(mv.run_id).data.metrics
    assert 0.0 <= metrics["eval/class_accuracy"] <= 1.0 and "eval/fid" in metrics
