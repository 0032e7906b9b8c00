"""Noisy classifier: logits/features shapes, t=None means clean, overfitting."""

import torch
import torch.nn.functional as F

from pipeline.models import NoisyClassifier, build_model


def tiny(**kwargs) -> NoisyClassifier:
    cfg = dict(in_channels=3, num_classes=5, model_channels=16, num_heads=2)
    cfg.update(kwargs)
    return build_model("classifier", **cfg)


def test_shapes_and_feature_dim():
    model = tiny(channel_mult=(1, 2, 4), attention_resolutions=(2,))
    assert model.feature_dim == 64
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert model(x, torch.tensor([0, 10, 999])).shape == (3, 5)
        assert model.features(x).shape == (3, 64)


def test_t_none_means_clean():
    model = tiny()
    with torch.no_grad():  # make the zero-initialised residual branches (and the timestep) matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, torch.zeros(2, dtype=torch.long)))
        diff = model.features(x) - model.features(x, torch.tensor([500, 500]))
        assert diff.abs().max() > 1e-3


def test_overfits_tiny_batch():
    model = tiny()
    x, t, labels = torch.randn(8, 3, 8, 8), torch.randint(0, 1000, (8,)), torch.randint(0, 5, (8,))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(200):
        loss = F.cross_entropy(model(x, t), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
    assert (model(x, t).argmax(1) == labels).all()
