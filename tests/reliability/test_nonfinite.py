"""NaN/Inf: the step is skipped or the stage stops, by spec; a non-finite checkpoint is never written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.train.loop import MAX_NONFINITE_IN_A_ROW, NonFiniteLoss, run_plain, tensor_stream
from pipeline.train.tasks import ClassifierTask

STAGE = {"model": {"name": "classifier", "args": {"in_channels": 1, "num_classes": 10, "model_channels": 8,
                                                   "channel_mult": [1], "num_res_blocks": 1}}}
SCALE = {"workers": 1, "gpus_per_worker": 0, "zero_stage": 1, "precision": "fp32"}


def _train(steps: int, **kw) -> dict:
    return {"steps": steps, "batch_size": 16, "lr": 1e-3, "checkpoint_every": 100, "log_every": 1, **kw}


def _samples() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(64, 1, 8, 8, generator=g), "label": torch.arange(64) % 10}


def _stream():
    return tensor_stream(_samples(), rank=0, world=1, micro=16, seed=0)


class NaNAt(ClassifierTask):
    """The loss is NaN at the given calls (0-based) of `loss`."""

    def __init__(self, calls: set[int] | None = None, always: bool = False):
        super().__init__(STAGE)
        self.calls, self.always, self.n = calls or set(), always, 0

    def loss(self, model, batch, gen):
        loss, parts = super().loss(model, batch, gen)
        bad = self.always or self.n in self.calls
        self.n += 1
        return (loss * float("nan") if bad else loss), parts


def test_stop_names_the_step_and_what_to_do() -> None:
    with pytest.raises(NonFiniteLoss) as err:
        run_plain(NaNAt({2}), _train(5), SCALE, _stream())
    assert str(err.value).startswith("non-finite loss at step 2; stopping (train.on_nonfinite=stop). Lower train.lr")
    assert "set train.on_nonfinite=skip" in str(err.value)


def test_skip_counts_and_keeps_the_step_budget() -> None:
    logged: list[dict] = []
    metrics, ctx, _ = run_plain(NaNAt({1, 2}), _train(4, on_nonfinite="skip"), SCALE, _stream(),
                                log_metrics=lambda m, s: logged.append(m))
    assert metrics["train/skipped_steps"] == 2.0
    assert len(ctx.step_times) == 4  # four real steps; the two skipped batches did not count
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m in logged)


def test_skip_gives_up_when_every_loss_is_nonfinite() -> None:
    with pytest.raises(NonFiniteLoss, match=rf"{MAX_NONFINITE_IN_A_ROW} non-finite losses in a row at step 0 "
                                            r"\(train.on_nonfinite=skip\); the run is diverging"):
        run_plain(NaNAt(always=True), _train(5, on_nonfinite="skip"), SCALE, _stream())


class _WithBuffer(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x, t=None):
        return self.inner(x, t)


class InfBufferAt(ClassifierTask):
    """The loss stays finite, but from call `k` on a float buffer (copied into the EMA) is Inf."""

    def __init__(self, k: int):
        super().__init__(STAGE)
        self.k, self.n = k, 0

    def build_model(self) -> nn.Module:
        return _WithBuffer(super().build_model())

    def loss(self, model, batch, gen):
        if self.n == self.k:
            model.module.scale.fill_(float("inf"))
        self.n += 1
        return super().loss(model, batch, gen)


def test_nonfinite_weights_are_never_checkpointed(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    saved: list[str] = []
    with pytest.raises(NonFiniteLoss, match="non-finite EMA weights at step 4; the checkpoint is not written"):
        run_plain(InfBufferAt(3), _train(6, checkpoint_every=2), SCALE, _stream(),
                  checkpoint_root=str(root))
    _, _, saved = run_plain(InfBufferAt(99), _train(2, checkpoint_every=2), SCALE, _stream(),
                            checkpoint_root=str(tmp_path / "ok"))
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]  # step 4's never appeared, not even partly
    assert [Path(p).name for p in saved] == ["step-00000002"]
