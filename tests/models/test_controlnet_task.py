"""ControlNetTask (eq. 50): the base stays frozen, the model is the base at step 0, the export reloads."""

from __future__ import annotations

import torch

from pipeline.models import ControlNet, build_model
from pipeline.train.controlnet_task import ControlNetTask, control_labels, edge_control, sample_controlled
from pipeline.train.export import export_weights, load_exported

BASE_ARGS = {"in_channels": 1, "model_channels": 16, "channel_mult": [1, 2], "num_heads": 2, "num_classes": 10}
META = {"name": "unet", "args": BASE_ARGS,
        "extra": {"kind": "diffusion", "num_classes": 10, "sample_shape": [1, 16, 16], "latent_scale": 1.0,
                  "diffusion": {"schedule": "cosine", "timesteps": 100, "parameterization": "v",
                                "label_dropout": 0.1}}}


def trained_base() -> torch.nn.Module:
    """A U-Net with every weight non-zero (a stand-in for a trained one: its output is not zero)."""
    base = build_model("unet", **BASE_ARGS)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return base.eval()


def batch(n: int = 4) -> dict[str, torch.Tensor]:
    img = -torch.ones(n, 1, 16, 16)
    img[:, :, 3:13, 5:11] = 1.0  # a bar with clear edges
    return {"image": img, "label": torch.arange(n) % 10}


def test_zero_init_identity_at_step_0():
    base = trained_base()
    task = ControlNetTask({"edges": {}}, base, META)
    model = task.build_model()
    assert isinstance(model, ControlNet)
    b = batch()
    control = edge_control(b["image"], {})
    assert control.shape == (4, 1, 16, 16) and control.sum() > 0
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([0, 10, 50, 99])
    with torch.no_grad():
        out, ref = model(x, t, control, y=b["label"]), base(x, t, y=b["label"])
    assert float(ref.abs().mean()) > 1e-3  # a non-trivial base output ...
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)  # ... reproduced exactly with the control added


def test_base_gets_no_gradient_and_the_copy_trains():
    base = trained_base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    task = ControlNetTask({"edges": {}, "class_labels": True}, base, META)
    model = task.build_model()
    loss, parts = task.loss(model, batch(), torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in model.base.parameters())
    assert all(not p.requires_grad for p in model.base.parameters())
    zero_grads = [p.grad for p in model.zero_convs.parameters()]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in zero_grads)  # the zero convs learn first
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    for k, v in model.base.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the task's own base is the frozen reference, untouched by training the copy
    assert all(not p.requires_grad for p in task.base.parameters())


def test_export_recipe_rebuilds_the_controlnet(tmp_path):
    base = trained_base()
    task = ControlNetTask({"edges": {"sigma": 1.0}}, base, META)
    model = task.build_model()
    with torch.no_grad():
        for p in model.zero_convs.parameters():
            p.add_(0.1)  # a "trained" ControlNet: control now changes the output
    name, args = task.model_recipe()
    export_weights(model.state_dict(), name, args, tmp_path, extra=task.export_extra())
    loaded, meta = load_exported(tmp_path)
    assert meta["extra"]["kind"] == "controlnet" and meta["extra"]["class_labels"] is False
    x, t, control = torch.randn(2, 1, 16, 16), torch.tensor([5, 60]), edge_control(batch(2)["image"], {})
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, control, y=None), model.eval()(x, t, control, y=None))
        out = sample_controlled(loaded, meta, torch.tensor([10, 10]), control, steps=2, seed=0)
    assert out.shape == (2, 1, 16, 16)


def test_control_labels():
    y = torch.tensor([1, 2, 3])
    assert control_labels(y, 0, True, 0.1) is None
    assert control_labels(y, 10, False, 0.1).tolist() == [10, 10, 10]
    assert control_labels(y, 10, True, 0.0).tolist() == [1, 2, 3]
    assert control_labels(y, 10, True, 1.0).tolist() == [10, 10, 10]
