"""The terminal of `pipeline run`: a progress bar per training stage, read from the stage's MLflow run."""

from __future__ import annotations

import io
import time
from pathlib import Path

import mlflow
from pipeline import progress


def test_bar_shows_step_loss_rate_and_time_left() -> None:
    assert progress.bar("diffusion", 150, 300, 0.0421, 2.5, width=10) == \
        "[diffusion] █████░░░░░ 150/300  loss 0.0421  2.50 steps/s  1:00 left"
    assert progress.bar("x", 0, 40, None, None, width=4) == "[x] ░░░░ 0/40"


def test_stage_progress_prints_a_line_per_quarter_when_not_on_a_terminal(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        client = MlflowClient()
        run_id = client.create_run(client.create_experiment("p")).info.run_id
        out = io.StringIO()
        monkeypatch.setattr(progress, "_terminal", (out, io.StringIO()))  # as while `pipeline run` logs to a file

        def train(steps) -> None:
            for step in steps:
                time.sleep(0.15)
                client.log_metric(run_id, "train/loss", 1.0 / step, step=step)

        with progress.stage_progress("distill", run_id, 80, every_s=0.05):  # halving 1: steps 1-40 of 80
            train(range(5, 45, 5))
        with progress.stage_progress("distill", run_id, 80, start=40, every_s=0.05):  # halving 2 continues
            train([80])
    finally:
        mlflow.set_tracking_uri(None)
    lines = out.getvalue().splitlines()
    steps = [int(ln.split()[2].split("/")[0]) for ln in lines]
    assert steps == sorted(steps) and steps[-1] == 80 and len(lines) <= 5, lines  # quarters, then the end
    assert all(ln.startswith("[distill] ") and ln.split()[2].endswith("/80") for ln in lines)
    assert "loss 0.0125" in lines[-1] and lines[-1].startswith("[distill] " + "█" * 24)
    assert " steps/s" in lines[0] and " left" in lines[0]
