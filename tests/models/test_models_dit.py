"""DiT: preset sizes, shapes, adaLN-Zero identity, conditioning, checkpointing, bf16, overfitting."""

import math

import pytest
import torch

from pipeline.models import DiT, build_model
from pipeline.models.dit import DIT_SIZES, dit_param_count, sincos_pos_embed_2d
from tests.models.helpers import assert_differs, assert_overfits, assert_same_gradients, perturb_

DIT_NAMES = [f"DiT-{s}/{p}" for s in DIT_SIZES for p in (2, 4, 8)]


def tiny(**kwargs) -> DiT:
    cfg = dict(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10
    )
    cfg.update(kwargs)
    return build_model("dit", **cfg)


@pytest.mark.parametrize("name", DIT_NAMES)
def test_preset_shapes_on_meta(name):
    size, patch = name[4:].split("/")
    hidden, depth, heads = DIT_SIZES[size]
    with torch.device("meta"):
        model = build_model(name, input_size=16, in_channels=4, num_classes=10)
        out = model(torch.randn(2, 4, 16, 16), torch.tensor([1, 2]), torch.tensor([3, 10]))
    assert model.patch_size == int(patch) and model.hidden_size == hidden and len(model.blocks) == depth
    assert model.blocks[0].num_heads == heads
    assert out.shape == (2, 8, 16, 16)


def test_reference_parameter_counts():
    # The fixed sin-cos positional embedding is a buffer, not a parameter.
    assert dit_param_count("DiT-B/2", input_size=32, in_channels=4) == 130_315_808
    assert dit_param_count("DiT-XL/2", input_size=32, in_channels=4) == 674_834_720


@pytest.mark.parametrize(
    "kwargs, out_channels",
    [
        ({}, 8),
        ({"learn_sigma": False}, 4),
        ({"num_classes": None}, 8),
        ({"context_dim": 12}, 8),
        ({"patch_size": 4, "context_dim": 12, "learn_sigma": False}, 4),
    ],
)
def test_tiny_shapes(kwargs, out_channels):
    model = tiny(**kwargs)
    x = torch.randn(2, 4, 8, 8)
    y = torch.tensor([1, 10]) if model.num_classes else None
    ctx = torch.randn(2, 5, 12) if model.context_dim else None
    with torch.no_grad():
        for t in (torch.tensor([0, 999]), torch.tensor([0.5, 900.25]), torch.tensor(3)):
            assert model(x, t, y=y, context=ctx).shape == (2, out_channels, 8, 8)


def test_pos_embed_is_fixed_sincos():
    emb = sincos_pos_embed_2d(16, 4)
    assert emb.shape == (16, 16)
    freqs = [1.0, 0.1, 0.01, 0.001]  # 10000^(-k / (dim / 4)), k = 0..3
    for r in range(4):
        for c in range(4):  # row-major: position r·4 + c is [sin(r f), cos(r f), sin(c f), cos(c f)]
            want = ([math.sin(r * f) for f in freqs] + [math.cos(r * f) for f in freqs]
                    + [math.sin(c * f) for f in freqs] + [math.cos(c * f) for f in freqs])
            torch.testing.assert_close(emb[r * 4 + c], torch.tensor(want), atol=1e-6, rtol=0)
    assert len({tuple(r.tolist()) for r in emb}) == 16  # every position distinct


def test_adaln_zero_identity_at_init():
    model = tiny(context_dim=6)
    h = torch.randn(2, 16, 32)
    c = torch.randn(2, 32)
    ctx = torch.randn(2, 3, 6)
    for block in model.blocks:
        torch.testing.assert_close(block(h, c, ctx), h, rtol=0, atol=0)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]), ctx)
    assert torch.equal(out, torch.zeros_like(out))


def test_unpatchify_inverts_patchify_layout():
    model = tiny(learn_sigma=False)
    x = torch.randn(2, 4, 8, 8)
    p = model.patch_size
    # (B, C, H, W) -> (B, T, p*p*C) with T in row-major order and (p, q, c) inside a patch.
    tokens = x.view(2, 4, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * 4)
    torch.testing.assert_close(model.unpatchify(tokens), x)


def test_class_and_context_matter():
    model = perturb_(tiny(context_dim=6))
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([5, 5]), torch.randn(2, 3, 6)
    with torch.no_grad():
        a = model(x, t, torch.tensor([0, 0]), ctx)
        assert_differs(a, model(x, t, torch.tensor([1, 1]), ctx))
        assert_differs(a, model(x, t, torch.tensor([0, 0]), ctx + 1))
        torch.testing.assert_close(model(x, t, None, ctx), model(x, t, torch.tensor([10, 10]), ctx))


def test_checkpointing_gives_same_gradients():
    ref = perturb_(tiny(context_dim=6))
    ckpt = tiny(context_dim=6, use_checkpoint=True)
    ckpt.load_state_dict(ref.state_dict())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    y, ctx = torch.tensor([0, 10]), torch.randn(2, 3, 6)
    assert_same_gradients(ref, ckpt, x, t, y, ctx)


def test_bf16_weights_with_long_and_float_timesteps():
    # DeepSpeed bf16 casts the weights; the timestep features must follow the weight dtype.
    model = perturb_(tiny()).to(torch.bfloat16)
    x = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    for t in (torch.tensor([1, 999]), torch.tensor([1.0, 999.0])):
        out = model(x, t, torch.tensor([1, 2]))
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_overfits_tiny_batch():
    model = tiny(context_dim=6)
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([1, 100, 500, 999])
    y, ctx = torch.tensor([0, 1, 2, 10]), torch.randn(4, 3, 6)
    target = torch.randn(4, 8, 8, 8)
    assert_overfits(model, (x, t, y, ctx), target, lr=3e-3, steps=300)


def test_timestep_matters():
    model = perturb_(tiny())
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        assert_differs(model(x, torch.tensor([1, 1]), y), model(x, torch.tensor([900, 900]), y))
