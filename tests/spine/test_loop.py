"""The per-worker training loop in one plain process (world_size=1, no Ray), with a real DeepSpeed engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.data import build_dataset, iterate_batches
from pipeline.train.export import load_exported
from pipeline.train.loop import NonFiniteLoss, epoch_stream, run_plain
from pipeline.train.tasks import AutoencoderTask, ClassifierTask

AE_STAGE = {"model": {"name": "kl_vae", "args": {"in_channels": 1, "base_channels": 16, "channel_mult": [1, 2],
                                                 "latent_channels": 2}},
            "objective": {"beta": 1e-5}}
SCALE = {"workers": 1, "gpus_per_worker": 0, "zero_stage": 1, "precision": "fp32"}


def _train(steps: int, every: int, **kw) -> dict:
    return {"steps": steps, "batch_size": 32, "lr": 2e-3, "checkpoint_every": every, "log_every": 5,
            "ema_decay": 0.9, "grad_clip": 1.0, **kw}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("digits")
    build_dataset("digits", d, image_size=16)
    return d


def _batches(d: Path):
    return epoch_stream(lambda epoch: iterate_batches(d, "train", 32, seed=epoch, epochs=1))


def _fixed_batches(d: Path):
    batch = next(iterate_batches(d, "train", 32, shuffle=False, epochs=1))
    return epoch_stream(lambda epoch: iter([{"image": batch["image"], "label": batch["label"]}] * 4))


def test_classifier_loss_decreases(digits):
    stage = {"model": {"name": "classifier", "args": {"in_channels": 1, "num_classes": 10,
                                                       "model_channels": 32}}}
    logged: list[tuple[int, float]] = []
    task = ClassifierTask(stage)
    metrics, ctx, _ = run_plain(task, _train(80, 1000, log_every=10), SCALE, _batches(digits), seed=0,
                                log_metrics=lambda m, s: logged.append((s, m["train/loss"])))
    assert [s for s, _ in logged] == list(range(10, 81, 10))
    first, last = logged[0][1], logged[-1][1]
    assert last < 0.6 * first, logged
    assert len(ctx.step_times) == 80


def test_checkpoint_resumes_exactly_at_saved_step(digits, tmp_path):
    task = AutoencoderTask(AE_STAGE)
    batches = _fixed_batches(digits)
    _, _, saved = run_plain(task, _train(20, 10), SCALE, batches, seed=3, checkpoint_root=str(tmp_path / "a"))
    assert [Path(p).name for p in saved] == ["step-00000010", "step-00000020"]
    assert json.loads((Path(saved[0]) / "trainer_state.json").read_text())["step"] == 10
    uninterrupted = load_file(str(Path(saved[1]) / "export" / "model.safetensors"))

    _, ctx, saved_b = run_plain(task, _train(20, 10), SCALE, batches, seed=3,
                                checkpoint_root=str(tmp_path / "b"), resume_dir=saved[0])
    assert len(ctx.step_times) == 10  # only the steps after the checkpoint ran
    assert [Path(p).name for p in saved_b] == ["step-00000020"]
    resumed = load_file(str(Path(saved_b[0]) / "export" / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for k in resumed:
        torch.testing.assert_close(resumed[k], uninterrupted[k], rtol=0, atol=0)

    model, meta = load_exported(Path(saved_b[0]) / "export")
    assert meta["name"] == "kl_vae" and isinstance(model, torch.nn.Module)


def test_nonfinite_loss_stops_or_skips(digits):
    class Exploding(AutoencoderTask):
        def loss(self, model, batch, gen):
            loss, parts = super().loss(model, batch, gen)
            self.calls = getattr(self, "calls", 0) + 1
            return (loss * float("nan") if self.calls == 3 else loss), parts

    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 2"):
        run_plain(Exploding(AE_STAGE), _train(6, 100), SCALE, _fixed_batches(digits))
    metrics, ctx, _ = run_plain(Exploding(AE_STAGE), _train(6, 100, on_nonfinite="skip"), SCALE,
                                _fixed_batches(digits))
    assert metrics["train/skipped_steps"] == 1.0
    assert len(ctx.step_times) == 6
