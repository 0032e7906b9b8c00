"""The shipped diffusion sweeps run, shrunk: jobs/sweep-schedule-loss.yaml (linear/cosine × L_simple/L_hybrid)
and jobs/sweep-lambda.yaml (the hybrid-loss λ), with real Ray Tune, Ray Train, DeepSpeed and an MLflow store."""

from __future__ import annotations

import itertools
import math

import pytest

from tests.reliability.helpers import ROOT

# The base job (jobs/sweep-base-pixel.yaml) at tiny size: no classifier stage (no FID features to train), a
# small U-Net, 100 diffusion steps so that the full VLB in bits/dim (one pass per timestep) stays cheap.
TINY_BASE = [
    "eval.classifier=null", "eval.num_samples=10",
    "stages.diffusion.model.args.model_channels=8", "stages.diffusion.diffusion.timesteps=100",
    "stages.diffusion.train.steps=6", "stages.diffusion.train.batch_size=32", "stages.diffusion.train.log_every=2",
    "stages.diffusion.train.checkpoint_every=6", "stages.diffusion.train.warmup_steps=0",
    "stages.diffusion.sampling.steps=2", "stages.diffusion.sampling.num_samples=10",
]


def _sweep_set(extra_base: list[str] = ()) -> list[str]:
    base = ", ".join(f"'{s}'" for s in [*extra_base, *TINY_BASE])
    return [f"set=[{base}]", "nll={num_samples: 16, batch_size: 16}"]


@pytest.mark.slow
def test_schedule_loss_and_lambda_sweeps_run(tmp_path, monkeypatch):
    import ray
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.tune import load_sweep, run_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    grid_set = _sweep_set()
    # the shipped sweep's `set:` (loss: hybrid with learned Σ) is replaced by ours: put it back in front
    lam_set = [*_sweep_set(["stages.diffusion.diffusion.loss=hybrid", "stages.diffusion.diffusion.learn_sigma=true",
                            "stages.diffusion.model.args.learn_sigma=true"]),
               "search.space={stages.diffusion.diffusion.lambda_vlb: {grid: [0.0001, 0.1]}}"]
    try:
        grid = run_sweep(load_sweep(ROOT / "jobs" / "sweep-schedule-loss.yaml", grid_set), sweep_set=grid_set)
        lam_result = run_sweep(load_sweep(ROOT / "jobs" / "sweep-lambda.yaml", lam_set), sweep_set=lam_set)
    finally:
        ray.shutdown()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    # schedule × loss: the four cells, each a finished model with its own held-out NLL in bits/dim
    assert [r.status for r in grid.rows] == ["completed"] * 4, [(r.config, r.error) for r in grid.rows]
    cells = set()
    for row in grid.rows:
        params = client.get_run(row.run_id).data.params
        cell = (params["diffusion.schedule"], params["diffusion.loss"])
        cells.add(cell)
        # L_hybrid trains Σ (eq. 15-16): the hybrid cells, and only they, have a U-Net with twice the channels
        assert params["diffusion.learn_sigma"] == params["model.args.learn_sigma"] == str(cell[1] == "hybrid")
        assert params["diffusion.timesteps"] == "100" and params["train.steps"] == "6"
        assert row.nll_bpd is not None and math.isfinite(row.nll_bpd) and row.nll_bpd > 0
        assert row.metric_value == pytest.approx(row.nll_bpd)
    assert cells == set(itertools.product(["linear", "cosine"], ["simple", "hybrid"]))
    nlls = [r.nll_bpd for r in grid.rows]
    assert len(set(nlls)) == 4  # four different models, not one config trained four times
    best = min(grid.rows, key=lambda r: r.nll_bpd)
    assert grid.best.trial_id == best.trial_id
    cand = tracking.resolve(grid.candidate)
    assert cand.run_id == best.run_id and grid.candidate.startswith("models:/pixel-ddpm/")

    # λ: L_hybrid = L_simple + λ L_vlb. The logged loss minus the logged MSE is λ·L_vlb, so it grows with λ
    # (by far more than the VLB of two barely trained models differs).
    assert [r.status for r in lam_result.rows] == ["completed"] * 2
    vlb_part = {}
    for row in lam_result.rows:
        params = client.get_run(row.run_id).data.params
        assert params["diffusion.loss"] == "hybrid" and params["diffusion.learn_sigma"] == "True"
        loss = {m.step: m.value for m in client.get_metric_history(row.run_id, "train/loss")}
        mse = {m.step: m.value for m in client.get_metric_history(row.run_id, "train/mse")}
        step = min(loss)
        vlb_part[float(params["diffusion.lambda_vlb"])] = loss[step] - mse[step]
    assert set(vlb_part) == {0.0001, 0.1}
    assert 0 < vlb_part[0.0001] and vlb_part[0.1] > 100 * vlb_part[0.0001], vlb_part
