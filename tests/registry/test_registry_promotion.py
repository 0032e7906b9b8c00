"""Promotion guarded by the stage's gate metric, lineage, and a downstream stage using the new champion."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import tracking
from pipeline.train.export import export_weights

ROOT = Path(__file__).resolve().parents[2]


def _store(tmp_path: Path, monkeypatch) -> None:
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.connect(uri)
    mlflow.set_tracking_uri(uri)


def _version(name: str, value: float, model_dir: Path, *, gate: str = "min", bound: float = 0.2,
             metric: str = "eval/class_accuracy", tags: dict[str, str] | None = None) -> tracking.ModelRef:
    """A registered version whose run carries `metric`=value and the stage's gate as params."""
    from mlflow.tracking import MlflowClient

    import mlflow

    client = MlflowClient()
    exp = mlflow.set_experiment("promotion-test")
    run_id = client.create_run(exp.experiment_id, tags={"pipeline.stage": "diffusion"}).info.run_id
    tracking.log_params_flat(run_id, {"registry.name": name, "registry.gate.metric": metric,
                                      "registry.gate.min": bound if gate == "min" else None,
                                      "registry.gate.max": bound if gate == "max" else None})
    client.log_metric(run_id, metric, value)
    client.set_terminated(run_id)
    return tracking.register(name, run_id, model_dir, tags or {})


def _dummy_model(tmp_path: Path) -> Path:
    return export_weights({"w": torch.zeros(2)}, "none", {}, tmp_path / "m")


def test_promote_refuses_worse_accepts_better_force_is_recorded(tmp_path, monkeypatch):
    _store(tmp_path, monkeypatch)
    m = _dummy_model(tmp_path)
    v1 = _version("gen", 0.70, m)
    tracking.set_alias("gen", "champion", v1.version)

    worse = _version("gen", 0.60, m)
    tracking.set_alias("gen", "candidate", worse.version)
    r = tracking.promote("gen", to="champion", from_="candidate")
    assert not r.promoted and f"is worse than champion v{v1.version} (0.7; higher is better)" in r.reason
    assert (r.candidate_value, r.previous_value) == (0.60, 0.70)
    assert tracking.resolve("models:/gen@champion").version == v1.version

    # inside the bounds is required even when better than the champion, and even with --force: min=0.2 gate
    below = _version("gen", 0.10, m)
    tracking.set_alias("gen", "champion", _version("gen", 0.05, m).version)
    assert not tracking.promote("gen", from_=below.version).promoted
    assert not tracking.promote("gen", from_=below.version, force=True).promoted
    tracking.set_alias("gen", "champion", v1.version)

    # a tie is no regression: the equal version takes the alias
    equal = _version("gen", 0.70, m)
    r = tracking.promote("gen", from_=equal.version)
    assert r.promoted and not r.forced and "not worse than" in r.reason
    tracking.set_alias("gen", "champion", v1.version)

    better = _version("gen", 0.80, m)
    tracking.set_alias("gen", "candidate", better.version)
    r = tracking.promote("gen", to="champion")
    assert r.promoted and not r.forced
    champ = tracking.resolve("models:/gen@champion")
    assert champ.version == better.version
    assert champ.tags["pipeline.promotion.champion.forced"] == "false"
    assert champ.tags["pipeline.promotion.champion.previous"] == f"models:/gen/{v1.version}"

    # --force moves the alias to a worse version and says so in the version's tags
    r = tracking.promote("gen", from_=worse.version, force=True)
    assert r.promoted and r.forced
    champ = tracking.resolve("models:/gen@champion")
    assert champ.version == worse.version
    assert champ.tags["pipeline.promotion.champion.forced"] == "true"


def test_promote_lower_is_better_for_max_gates(tmp_path, monkeypatch):
    _store(tmp_path, monkeypatch)
    m = _dummy_model(tmp_path)
    a = _version("ae", 0.030, m, gate="max", bound=0.05, metric="eval/recon_mse")
    tracking.set_alias("ae", "champion", a.version)
    b = _version("ae", 0.040, m, gate="max", bound=0.05, metric="eval/recon_mse")
    assert not tracking.promote("ae", from_=b.version).promoted
    c = _version("ae", 0.020, m, gate="max", bound=0.05, metric="eval/recon_mse")
    assert tracking.promote("ae", from_=c.version).promoted
    assert tracking.resolve("models:/ae@champion").version == c.version


def test_promote_cli_exit_codes_and_lineage(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main

    _store(tmp_path, monkeypatch)
    m = _dummy_model(tmp_path)
    ae = _version("ae", 0.03, m, gate="max", bound=0.05, metric="eval/recon_mse",
                  tags={"pipeline.data_manifest_sha256": "d" * 64, "pipeline.spec_sha256": "aaaa"})
    tracking.set_alias("ae", "champion", ae.version)
    gen1 = _version("gen", 0.7, m, tags={"pipeline.input.autoencoder": ae.uri, "pipeline.spec_sha256": "bbbb",
                                         "pipeline.data_manifest_sha256": "d" * 64})
    tracking.set_alias("gen", "champion", gen1.version)
    gen2 = _version("gen", 0.5, m, tags={"pipeline.input.autoencoder": ae.uri})
    tracking.set_alias("gen", "candidate", gen2.version)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["promote", "gen", "--to", "champion", "--tracking-uri", uri]) == 1
    assert "stays v1" in capsys.readouterr().out
    dist = _version("dist", 0.9, m, tags={"pipeline.input.diffusion": gen1.uri, "pipeline.spec_sha256": "cccc"})
    tracking.set_alias("dist", "champion", dist.version)

    node = tracking.lineage("models:/dist@champion")
    assert node.ref.uri == dist.uri
    assert [(n.role, n.ref.uri) for n in node.inputs] == [("diffusion", gen1.uri)]
    assert [(n.role, n.ref.uri) for n in node.inputs[0].inputs] == [("autoencoder", ae.uri)]
    assert node.inputs[0].inputs[0].data_sha256 == "d" * 64
    assert main(["lineage", "models:/dist@champion", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{dist.uri}  run=")
    assert out[1].strip().startswith(f"diffusion: {gen1.uri}") and out[2].strip().startswith(
        f"autoencoder: {ae.uri}")
    assert out[3].strip() == f"data: manifest sha256 {'d' * 64}"


# ----------------------------------------------------------------------------- real server, real stage

JOB = {
    "name": "promo", "seed": 0,
    "data": {"source": "digits", "dir": "data/digits", "image_size": 16},
    "tracking": {"experiment": "promo"},
    "eval": {"classifier": None, "num_samples": 10},
    "ray": {"num_cpus": 8},
    "stages": {
        "diffusion": {
            "kind": "diffusion",
            "model": {"name": "unet", "args": {"in_channels": 1, "model_channels": 8, "channel_mult": [1],
                                               "num_res_blocks": 1, "attention_resolutions": [], "num_heads": 1,
                                               "num_classes": 10}},
            "diffusion": {"schedule": "cosine", "timesteps": 100, "parameterization": "v"},
            "scale": {"workers": 1}, "train": {"steps": 2},
            "register": {"name": "promo-ddpm", "gate": {"metric": "eval/class_accuracy", "min": 0.0}},
        },
        "distill": {
            "kind": "distill", "needs": ["diffusion"], "teacher_steps": 4, "halvings": 1,
            "sampling": {"num_samples": 10},
            "scale": {"workers": 1}, "train": {"steps": 3, "batch_size": 16, "checkpoint_every": 3, "log_every": 1},
            # a finite loss (NaN fails every gate): this test is about lineage, not quality
            "register": {"name": "promo-distilled", "gate": {"metric": "train/loss", "max": 1.0e6}},
        },
    },
}


def _teacher(tmp_path: Path, seed: int) -> Path:
    """An exported (untrained) pixel DDPM, exactly as the diffusion stage exports one."""
    from pipeline.config import parse_spec
    from pipeline.train.tasks import DiffusionTask

    stage = parse_spec(JOB).stages["diffusion"].model_dump(mode="json")
    task = DiffusionTask(stage, num_classes=10, data={"latent_scale": 1.0, "sample_shape": [1, 16, 16]})
    torch.manual_seed(seed)
    model = task.build_model()
    name, args = task.model_recipe()
    return export_weights(model.state_dict(), name, args, tmp_path / f"teacher{seed}", extra=task.export_extra())


@pytest.mark.slow
def test_downstream_stage_uses_promoted_champion_on_postgres_server(tmp_path, monkeypatch, shared_mlflow_server):
    import ray
    from mlflow.tracking import MlflowClient

    import mlflow
    from pipeline import stages
    from pipeline.config import parse_spec

    monkeypatch.chdir(tmp_path)
    srv = shared_mlflow_server  # PostgreSQL-backed, basic auth; shared with the other tests that need a server
    for k, v in srv.env.items():
        monkeypatch.setenv(k, v)
    tracking.connect(srv.uri)
    mlflow.set_tracking_uri(srv.uri)
    v1 = _version("promo-ddpm", 0.50, _teacher(tmp_path, 1))
    tracking.set_alias("promo-ddpm", "champion", v1.version)
    worse = _version("promo-ddpm", 0.40, _teacher(tmp_path, 2))
    tracking.set_alias("promo-ddpm", "candidate", worse.version)
    assert not tracking.promote("promo-ddpm", to="champion").promoted
    better = _version("promo-ddpm", 0.60, _teacher(tmp_path, 3))
    tracking.set_alias("promo-ddpm", "candidate", better.version)
    assert tracking.promote("promo-ddpm", to="champion").promoted

    spec = parse_spec(JOB)
    data_dir = stages.ensure_data(spec)
    stages.init_ray(spec)
    try:
        client = MlflowClient()
        exp = mlflow.set_experiment("promo")
        parent = client.create_run(exp.experiment_id, run_name="promo").info.run_id
        job_file = tmp_path / "promo.yaml"
        job_file.write_text(yaml.safe_dump(JOB))
        ctx = stages.JobContext(spec=spec, spec_path=job_file, uri=srv.uri,
                                experiment_id=exp.experiment_id, parent_run_id=parent,
                                storage=str(tmp_path / "ray"), data_dir=data_dir)
        outcome = stages.run_stage(ctx, "distill")
    finally:
        ray.shutdown()
    assert outcome.status == "trained"
    made = tracking.resolve(f"models:/promo-distilled/{outcome.version}")
    # the version is an MLflow model in the server's S3 bucket, loaded through the server with mlflow.pyfunc
    import pandas as pd

    images = mlflow.pyfunc.load_model(made.uri).predict(pd.DataFrame({"label": [1, 2]}), params={"seed": 3})
    assert images.shape[0] == 2 and images.dtype == "uint8"
    model_id = made.source.removeprefix("models:/")
    assert any(model_id in k and k.endswith("data/model/model.safetensors") for k in srv.s3.keys()), srv.s3.keys()
    assert made.tags["pipeline.input.diffusion"] == f"models:/promo-ddpm/{better.version}"
    run = client.get_run(made.run_id)
    assert run.data.tags["pipeline.input.diffusion"] == f"models:/promo-ddpm/{better.version}"
    assert run.data.metrics["train/loss"] > 0
    chain = tracking.lineage("models:/promo-distilled@champion")
    assert [n.ref.uri for n in chain.inputs] == [f"models:/promo-ddpm/{better.version}"]
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] not in str(client.get_run(made.run_id).data.params)
