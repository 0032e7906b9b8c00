"""The cascade, Imagen and ControlNet jobs end to end, shrunk: real Ray, DeepSpeed, MLflow registry and shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.helpers import run_job, run_pipeline

CASCADE = [
    "eval.num_samples=16",
    "stages.base.train.steps=6", "stages.base.train.checkpoint_every=6", "stages.base.sampling.steps=2",
    "stages.sr16.train.steps=6", "stages.sr16.train.checkpoint_every=6", "stages.sr16.sampling.steps=2",
    "stages.sr16.register.gate.min=-1.0",
]
IMAGEN = [  # the frozen MiniLM text encoder of the job (the `text` extra, installed by CI)
    "eval.num_samples=16", "stages.classifier.train.steps=30", "stages.classifier.register.gate.min=0.0",
    "stages.base.train.steps=6", "stages.base.train.checkpoint_every=6", "stages.base.sampling.steps=2",
    "stages.base.register.gate.max=100.0",
    "stages.sr16.train.steps=6", "stages.sr16.train.checkpoint_every=6", "stages.sr16.sampling.steps=2",
    "stages.sr16.register.gate.min=-1.0",
]
CONTROLNET = [
    "eval.num_samples=16",
    "stages.base.train.steps=6", "stages.base.train.checkpoint_every=6", "stages.base.sampling.steps=2",
    "stages.controlnet.train.steps=6", "stages.controlnet.train.checkpoint_every=6",
    "stages.controlnet.sampling.steps=2", "stages.controlnet.register.gate.min=-1.0",
]


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def _champion_artifacts(db: Path, name: str) -> tuple[dict[str, float], list[str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    mv = client.get_model_version_by_alias(name, "champion")
    run = client.get_run(mv.run_id)
    return run.data.metrics, [a.path for a in client.list_artifacts(mv.run_id, "samples")]


@pytest.mark.slow
@pytest.mark.e2e_suite
def test_cascade_imagen_and_controlnet_jobs(tmp_path):
    (tmp_path / "cascade").mkdir()
    cascade = run_job(tmp_path / "cascade", "cascade.yaml", CASCADE)
    assert cascade.returncode == 0, cascade.stdout[-3000:] + cascade.stderr[-3000:]
    db = tmp_path / "cascade" / "mlflow.db"
    metrics, artifacts = _champion_artifacts(db, "cascade-base")
    assert "samples/cascade_grid.png" in artifacts and "eval/heldout_mse" in metrics
    metrics, artifacts = _champion_artifacts(db, "cascade-sr16")
    assert {"samples/superres_grid.png", "samples/cascade_grid.png"} <= set(artifacts)
    for k in ("eval/psnr", "eval/ssim", "eval/bicubic_psnr", "eval/bicubic_ssim", "eval/ssim_gain"):
        assert k in metrics, k
    assert metrics["eval/bicubic_psnr"] > 10  # bicubic upsampling of real crops is close to the truth
    grid = tmp_path / "cascade" / "sampled.png"
    sample = run_pipeline(tmp_path / "cascade", "sample", "models:/cascade-sr16@champion", "--label", "2",
                          "--num", "3", "--nrow", "3", "--out", str(grid))
    assert sample.returncode == 0, sample.stdout[-3000:] + sample.stderr[-3000:]
    # three 16x16 final images in one row, 1-pixel borders, scaled 4x: the whole cascade was sampled
    assert "cascade 8px → 16px" in sample.stdout and _png_size(grid) == ((3 * 17 + 1) * 4, (17 + 1) * 4)

    (tmp_path / "imagen").mkdir()
    imagen = run_job(tmp_path / "imagen", "imagen.yaml", IMAGEN)
    assert imagen.returncode == 0, imagen.stdout[-3000:] + imagen.stderr[-3000:]
    db = tmp_path / "imagen" / "mlflow.db"
    for name in ("imagen-classifier", "imagen-base"):
        _champion_artifacts(db, name)  # raises unless the stage registered a champion
    metrics, artifacts = _champion_artifacts(db, "imagen-sr16")
    assert {"samples/superres_grid.png", "samples/cascade_grid.png"} <= set(artifacts)
    assert 0.0 <= metrics["eval/cascade_class_accuracy"] <= 1.0 and metrics["eval/bicubic_psnr"] > 10
    grid = tmp_path / "imagen" / "sampled.png"
    sample = run_pipeline(tmp_path / "imagen", "sample", "models:/imagen-sr16@champion",
                          "--caption", "a handwritten two", "--caption", "the digit five, written by hand",
                          "--num", "2", "--out", str(grid))
    assert sample.returncode == 0, sample.stdout[-3000:] + sample.stderr[-3000:]
    assert "4 samples of the cascade" in sample.stdout and grid.stat().st_size > 0
    no_text = run_pipeline(tmp_path / "imagen", "sample", "models:/imagen-sr16@champion", "--label", "2")
    assert no_text.returncode != 0 and "give --caption" in no_text.stderr

    (tmp_path / "controlnet").mkdir()
    control = run_job(tmp_path / "controlnet", "controlnet.yaml", CONTROLNET)
    assert control.returncode == 0, control.stdout[-3000:] + control.stderr[-3000:]
    db = tmp_path / "controlnet" / "mlflow.db"
    metrics, artifacts = _champion_artifacts(db, "controlnet-base")
    assert "samples/grid.png" in artifacts
    metrics, artifacts = _champion_artifacts(db, "controlnet-digits")
    assert "samples/controlnet_grid.png" in artifacts
    for k in ("eval/edge_f1", "eval/base_edge_f1", "eval/edge_f1_gain"):
        assert 0 <= metrics[k] <= 1 or k.endswith("gain"), k
    assert "pipeline sample models:/controlnet-digits@champion --control PICTURE.png" in control.stdout
    from PIL import Image
    from skimage import data as skdata

    Image.fromarray(skdata.camera()).save(tmp_path / "camera.png")
    grid = tmp_path / "controlnet" / "grid.png"
    sample = run_pipeline(tmp_path / "controlnet", "sample", "models:/controlnet-digits@champion", "--control",
                          str(tmp_path / "camera.png"), "--num", "4", "--steps", "2", "--out", str(grid))
    assert sample.returncode == 0, sample.stdout[-3000:] + sample.stderr[-3000:]
    assert _png_size(grid) == ((5 * 17 + 1) * 4, (17 + 1) * 4)  # one row: the edge map and 4 samples, 16×16
