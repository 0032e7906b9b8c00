"""U-Net: shapes per conditioning mode, zero-init output, checkpointing, conditioning, overfitting."""

import pytest
import torch

from pipeline.models import UNet, build_model
from tests.models.helpers import assert_differs, assert_overfits, assert_same_gradients, perturb_


def tiny(**kwargs) -> UNet:
    cfg = dict(in_channels=3, model_channels=16, channel_mult=(1, 2), attention_resolutions=(2,), num_heads=2)
    cfg.update(kwargs)
    return build_model("unet", **cfg)


@pytest.mark.parametrize(
    "kwargs, out_channels",
    [
        ({}, 3),
        ({"learn_sigma": True}, 6),
        ({"out_channels": 5}, 5),
        ({"num_classes": 10}, 3),
        ({"context_dim": 12}, 3),
        ({"num_classes": 10, "context_dim": 12, "learn_sigma": True, "channel_mult": (1, 2, 2)}, 6),
        ({"model_channels": 32, "num_res_blocks": 2, "attention_resolutions": (1, 2)}, 3),
    ],
)
def test_shapes(kwargs, out_channels):
    model = tiny(**kwargs)
    x = torch.randn(2, 3, 8, 8)
    y = torch.tensor([1, 10]) if model.num_classes else None
    ctx = torch.randn(2, 5, 12) if model.context_dim else None
    with torch.no_grad():
        for t in (torch.tensor([0, 999]), torch.tensor([0.5, 900.25]), torch.tensor(3)):
            assert model(x, t, y=y, context=ctx).shape == (2, out_channels, 8, 8)


def test_rejects_indivisible_size():
    with pytest.raises(ValueError, match="divisible"):
        tiny()(torch.randn(1, 3, 7, 7), torch.zeros(1))


def test_zero_output_at_init_then_nonzero_after_step():
    model = tiny(num_classes=4)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 20])
    out = model(x, t)
    assert torch.equal(out, torch.zeros_like(out))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ((out - torch.randn_like(out)) ** 2).mean().backward()
    opt.step()
    assert model(x, t).abs().max() > 0


def test_checkpointing_gives_same_gradients():
    ref = perturb_(tiny(num_classes=4, context_dim=8, use_checkpoint=False))
    ckpt = tiny(num_classes=4, context_dim=8, use_checkpoint=True)
    ckpt.load_state_dict(ref.state_dict())
    x, t, y, ctx = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 4]), torch.randn(2, 3, 8)
    assert_same_gradients(ref, ckpt, x, t, y, ctx)


def test_cross_attention_attends_to_context():
    model = tiny(context_dim=8)
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.tensor([5, 5]), torch.randn(2, 4, 8)
    model.out[-1].weight.data.normal_(std=0.05)
    with torch.no_grad():
        # Zero-initialised cross-attention projections: the context has no effect at init.
        torch.testing.assert_close(model(x, t, context=ctx), model(x, t, context=ctx + 1))
        perturb_(model)
        assert_differs(model(x, t, context=ctx), model(x, t, context=ctx + 1))


def test_class_embedding_matters_and_null_label():
    model = perturb_(tiny(num_classes=3))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 5])
    with torch.no_grad():
        a = model(x, t, y=torch.tensor([0, 0]))
        b = model(x, t, y=torch.tensor([1, 1]))
        assert_differs(a, b)
        torch.testing.assert_close(model(x, t, y=None), model(x, t, y=torch.tensor([3, 3])))


def test_overfits_tiny_batch():
    model = tiny(num_classes=4, context_dim=8)
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([1, 100, 500, 999])
    y, ctx = torch.tensor([0, 1, 2, 4]), torch.randn(4, 3, 8)
    target = torch.randn(4, 3, 8, 8)
    assert_overfits(model, (x, t, y, ctx), target, lr=2e-3, steps=100)


def test_timestep_matters():
    model = perturb_(tiny())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_differs(model(x, torch.tensor([1, 1])), model(x, torch.tensor([900, 900])))
        # Integer and float timesteps give the same embedding.
        torch.testing.assert_close(model(x, torch.tensor([7, 7])), model(x, torch.tensor([7.0, 7.0])))


def test_bf16_weights_with_long_timesteps():
    # DeepSpeed bf16 casts the weights; the timestep features must follow the weight dtype.
    model = perturb_(tiny(num_classes=4, context_dim=8)).to(torch.bfloat16)
    x, ctx = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16), torch.randn(2, 3, 8, dtype=torch.bfloat16)
    out = model(x, torch.tensor([1, 999]), torch.tensor([0, 4]), ctx)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
