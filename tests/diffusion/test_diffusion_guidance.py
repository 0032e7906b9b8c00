"""Classifier-free guidance (eq. 40) and classifier gradients (eq. 36)."""

import pytest
import torch

from pipeline.diffusion import classifier_free, classifier_grad, condition_dropout, drop_labels

F64 = torch.float64


class CountingModel:
    """out = x·(1 + emb[y]) + t, with 4 output channels (2 "ε" + 2 "variance"); counts forward calls."""

    def __init__(self):
        self.emb = torch.tensor([[0.1, -0.2], [0.5, 0.3], [-0.4, 0.9], [0.0, 0.0]], dtype=F64)
        self.calls = 0

    def __call__(self, x, t, y):
        self.calls += 1
        e = x * (1 + self.emb[y]) + t[:, None].to(x)
        return torch.cat([e, 10 * e + y[:, None].to(x)], dim=1)


@pytest.fixture()
def inputs():
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(5, 2, generator=gen, dtype=F64),
        torch.tensor([3, 1, 4, 1, 5]),
        torch.tensor([0, 1, 2, 1, 0]),
    )


def test_cfg_w0_equals_conditional(inputs):
    x, t, y = inputs
    m = CountingModel()
    assert torch.allclose(classifier_free(m, y, 3, 0.0)(x, t), m(x, t, y))


@pytest.mark.parametrize("eps_channels", [None, 2])
def test_cfg_batched_equals_two_calls(inputs, eps_channels):
    x, t, y = inputs
    w = 2.5
    m = CountingModel()
    guided = classifier_free(m, y, 3, w, eps_channels=eps_channels)(x, t)
    assert m.calls == 1  # one batched forward pass
    cond, uncond = m(x, t, y), m(x, t, torch.full_like(y, 3))
    c = 4 if eps_channels is None else eps_channels
    assert torch.allclose(guided[:, :c], (1 + w) * cond[:, :c] - w * uncond[:, :c])  # eq. 40
    assert torch.allclose(guided[:, c:], cond[:, c:])  # variance channels from the conditional branch


def test_cfg_with_embedding_conditioning():
    """y as (B, D) embeddings and a (D,) null embedding."""
    x = torch.randn(3, 2, dtype=F64)
    y = torch.randn(3, 4, dtype=F64)
    null = torch.zeros(4, dtype=F64)

    def model_fn(x, t, y):
        return x * y.sum(1, keepdim=True)

    out = classifier_free(model_fn, y, null, 1.0)(x, torch.zeros(3, dtype=torch.long))
    assert torch.allclose(out, 2 * x * y.sum(1, keepdim=True))


def test_classifier_grad_matches_analytic_softmax_gradient():
    """For logits = x W, ∇_x log softmax(xW)_y = W[:, y] − W p."""
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(3, 4, generator=gen, dtype=F64)
    x = torch.randn(5, 3, generator=gen, dtype=F64)
    y = torch.tensor([0, 3, 2, 1, 1])
    grad = classifier_grad(lambda x, t: x @ W, y)(x, torch.zeros(5, dtype=torch.long))
    p = torch.softmax(x @ W, dim=1)
    assert torch.allclose(grad, W[:, y].T - p @ W.T)
    with torch.no_grad():  # works inside the samplers' no_grad
        assert torch.allclose(classifier_grad(lambda x, t: x @ W, y)(x, None), grad)


def test_condition_dropout_rate_and_null_labels():
    """Training-time ∅ for classifier-free guidance (eq. 40): the mask follows the rate, dropped labels become ∅."""
    g = torch.Generator().manual_seed(0)
    drop = condition_dropout(20000, 0.1, generator=g)
    assert drop.dtype == torch.bool and abs(drop.float().mean().item() - 0.1) < 0.01  # ±4.7 standard errors
    assert not condition_dropout(100, 0.0, generator=g).any() and condition_dropout(100, 1.0, generator=g).all()
    y = torch.tensor([0, 1, 2, 3, 4])
    out = drop_labels(y, torch.tensor([True, False, True, False, False]), 10)
    assert out.tolist() == [10, 1, 10, 3, 4] and y.tolist() == [0, 1, 2, 3, 4]
