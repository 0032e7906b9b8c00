"""ControlNet (eq. 50): identity to the frozen base at initialisation, control signal, gradients."""

import copy

import pytest
import torch

from pipeline.models import ControlNet, build_model
from tests.models.helpers import perturb_


@pytest.fixture
def base():
    unet = build_model(
        "unet", in_channels=3, model_channels=16, num_heads=2, num_classes=4, context_dim=8,
        channel_mult=(1, 2, 2),
    )
    return perturb_(unet)  # a "pretrained" base with non-zero output


def inputs():
    return (
        torch.randn(2, 3, 8, 8), torch.tensor([3, 600]), torch.randn(2, 2, 8, 8),
        torch.tensor([1, 4]), torch.randn(2, 3, 8),
    )


def test_identity_at_init_and_base_frozen(base):
    reference = copy.deepcopy(base)
    net = build_model("controlnet", base_unet=base, control_channels=2)
    assert isinstance(net, ControlNet)
    x, t, control, y, ctx = inputs()
    with torch.no_grad():
        # The zero convolutions make every residual exactly zero ...
        skip_res, mid_res = net.control_residuals(x, t, control, y, ctx)
        assert all(torch.equal(r, torch.zeros_like(r)) for r in [*skip_res, mid_res])
        # ... so the output is the base model's (up to CPU kernels' bitwise non-reproducibility).
        torch.testing.assert_close(net(x, t, control, y, ctx), reference(x, t, y, ctx), rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in net.base.parameters())
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("base.") for n in trainable)


def test_control_changes_output_after_training_and_grads_skip_base(base):
    net = ControlNet(base, control_channels=2)
    x, t, control, y, ctx = inputs()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = net(x, t, control, y, ctx).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in net.base.parameters())
    with torch.no_grad():
        diff = net(x, t, control, y, ctx) - net(x, t, control + 1, y, ctx)
        assert diff.abs().max() > 1e-3


def test_rejects_non_unet_base():
    with pytest.raises(ValueError, match="UNet"):
        ControlNet(torch.nn.Linear(2, 2), control_channels=1)
