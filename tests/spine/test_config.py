"""Job specs: validation, overrides and the messages a user sees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import DataSpec, SpecError, apply_overrides, load_spec

ROOT = Path(__file__).resolve().parents[2]
LDM = ROOT / "jobs" / "ldm.yaml"


def _write(tmp_path: Path, raw: dict) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def _raw() -> dict:
    return yaml.safe_load(LDM.read_text())


def test_shipped_job_parses_with_every_stage():
    spec = load_spec(LDM)
    assert list(spec.stages) == ["autoencoder", "classifier", "encode", "diffusion", "distill"]
    assert spec.stages["diffusion"].needs == ["encode"]
    assert spec.stages["distill"].registry.name == "ldm-distilled"
    assert spec.stages["autoencoder"].scale.zero_stage in (0, 1, 2, 3)


def test_set_overrides_any_field_with_yaml_typed_values():
    spec = load_spec(LDM, ["stages.diffusion.train.steps=7", "stages.diffusion.scale.workers=4",
                           "data.held_out=0.2", "stages.distill.guidance=1.5"])
    assert spec.stages["diffusion"].train.steps == 7
    assert spec.stages["diffusion"].scale.workers == 4
    assert spec.data.held_out == 0.2
    assert spec.stages["distill"].guidance == 1.5


def test_a_batch_that_does_not_split_over_the_workers_is_refused():
    with pytest.raises(SpecError, match=r"stages\.diffusion.*train.batch_size \(128\) must be a multiple of "
                                        r"scale.workers \(3\)"):
        load_spec(LDM, ["stages.diffusion.scale.workers=3"])


def test_random_crops_only_where_images_are_cropped_as_read():
    with pytest.raises(SpecError, match=r"data.crop: random crops images as shards are read.*'digits' source"):
        load_spec(LDM, ["data.crop=random"])
    assert DataSpec(source="shards", dir="s3://bucket/shards", image_size=16, crop="random").crop == "random"


def test_unknown_key_names_file_and_key_path(tmp_path):
    raw = _raw()
    raw["stages"]["diffusion"]["train"]["stepz"] = 3
    path = _write(tmp_path, raw)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "stages.diffusion.train.stepz: unknown key" in msg


def test_wrong_type_says_what_was_expected(tmp_path):
    path = _write(tmp_path, _raw())
    with pytest.raises(SpecError) as err:
        load_spec(path, ["stages.autoencoder.train.steps=many"])
    assert "stages.autoencoder.train.steps" in str(err.value)
    assert "valid integer" in str(err.value) and "'many'" in str(err.value)


def test_stage_that_needs_a_missing_stage_is_rejected(tmp_path):
    raw = _raw()
    raw["stages"]["distill"]["needs"] = ["teacher"]
    with pytest.raises(SpecError, match="stage 'distill' needs 'teacher', which is not a stage"):
        load_spec(_write(tmp_path, raw))


def test_missing_files_are_rejected(tmp_path):
    with pytest.raises(SpecError, match="job file not found"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="image folder .* does not exist"):
        load_spec(_write(tmp_path, _raw()), [f"data.source=imagefolder:{tmp_path / 'missing'}"])
    with pytest.raises(SpecError, match="no shards at"):
        load_spec(_write(tmp_path, _raw()), ["data.source=shards", f"data.dir={tmp_path / 'none'}"])


def test_malformed_yaml_gives_line_and_column(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nstages: {a: [1, 2}\n")
    with pytest.raises(SpecError, match=r"malformed YAML at line 2, column \d+"):
        load_spec(p)


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(SpecError, match="is not a mapping"):
        apply_overrides({"name": "x"}, ["name.sub=1"], "job.yaml")


def test_cli_reports_bad_spec_without_traceback(tmp_path):
    raw = _raw()
    raw["stages"]["autoencoder"]["scale"]["zero_stage"] = 5
    path = _write(tmp_path, raw)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # default store: ./mlflow.db
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-m", "pipeline", "run", str(path)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path, env=env)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "stages.autoencoder.scale.zero_stage" in out.stderr
    assert not (tmp_path / "mlflow.db").exists()  # the cwd's default store: nothing started before validation
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]  # nor any other file written


def test_gate_bounds():
    spec = load_spec(LDM)
    gate = spec.stages["distill"].registry.gate
    assert gate.passes({gate.metric: 0.9}) and not gate.passes({gate.metric: 0.1})
    assert not gate.passes({}) and not gate.passes({gate.metric: float("nan")})
