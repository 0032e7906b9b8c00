"""Inside a real job (Ray + DeepSpeed + embedded MLflow store): a worse new version does not take `champion`
from a better one, and does with `pipeline run --force-promote`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.helpers import run_pipeline, write_job

# 40 steps: enough for this tiny classifier to leave chance clearly behind (measured 0.25 vs 0.06 untrained)
ONE_WORKER = ["stages.classifier.scale.workers=1", "stages.classifier.train.steps=40",
              "stages.classifier.train.ema_decay=0.0", "stages.classifier.train.checkpoint_every=40"]
UNTRAINED = ["stages.classifier.train.lr=1.0e-9"]  # another spec key, and the accuracy of the initial weights


def _store(cwd: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")


def _accuracy(client, name: str, version: str) -> float:
    return client.get_run(client.get_model_version(name, version).run_id).data.metrics["eval/accuracy"]


def _run(cwd: Path, job: Path, *args: str) -> str:
    sets = [a for item in args if "=" in item for a in ("--set", item)]
    flags = [a for a in args if "=" not in a]
    r = run_pipeline(cwd, "run", str(job), *sets, *flags)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


@pytest.mark.slow
def test_worse_version_keeps_champion_unless_forced(tmp_path):
    from pipeline.data import build_dataset

    build_dataset("digits", tmp_path / "digits", image_size=8, shard_size=800, seed=0)
    job = write_job(tmp_path / "job.yaml", tmp_path / "digits")
    name = "rel-classifier"

    _run(tmp_path, job, *ONE_WORKER)
    client = _store(tmp_path)
    v1 = client.get_model_version_by_alias(name, "champion").version
    a1 = _accuracy(client, name, v1)

    out = _run(tmp_path, job, *ONE_WORKER, *UNTRAINED)
    cand = client.get_model_version_by_alias(name, "candidate").version
    a2 = _accuracy(client, name, cand)
    assert cand != v1 and a2 < a1 - 0.05, (a1, a2)  # the second spec is clearly worse (eval/accuracy, min gate)
    assert client.get_model_version_by_alias(name, "champion").version == v1
    assert f"{name} v{cand} not promoted: eval/accuracy={a2:.6g} is worse than champion v{v1} ({a1:.6g}" in out
    assert f"champion stays v{v1}" in out

    out = _run(tmp_path, job, *ONE_WORKER, *UNTRAINED, "--force-promote")
    champ = client.get_model_version_by_alias(name, "champion")
    assert int(champ.version) == int(cand) + 1  # the same spec trained again (its key is not the champion's)
    assert _accuracy(client, name, champ.version) < a1
    assert champ.tags["pipeline.promotion.champion.forced"] == "true"
    assert champ.tags["pipeline.promotion.champion.previous"] == f"models:/{name}/{v1}"
    assert champ.tags["pipeline.promotion.champion.reason"].startswith("forced: eval/accuracy=")
    v1_tags = client.get_model_version(name, v1).tags  # the first, unforced promotion is recorded as such
    assert v1_tags["pipeline.promotion.champion.forced"] == "false"
