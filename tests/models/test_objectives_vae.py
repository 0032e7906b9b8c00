"""VAE objective: closed-form KL (eq. 7) and the negative ELBO / beta-VAE loss (eq. 6-7, 10)."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from pipeline.objectives.autoencoder import gaussian_kl, vae_loss


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
    kl = gaussian_kl(mean, logvar)
    assert kl.shape == (3,)
    torch.testing.assert_close(kl, expected)
    assert torch.all(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)) == 0)


def test_vae_loss_gaussian_by_hand():
    x = torch.tensor([[0.5, -1.0], [1.0, 0.0]])
    x_hat = torch.tensor([[0.0, -1.0], [0.0, 1.0]])
    mean = torch.tensor([[1.0], [0.0]])
    logvar = torch.tensor([[0.0], [math.log(2.0)]])
    sse = [0.25, 2.0]
    kl = [0.5 * 1.0, 0.5 * (2.0 - 1.0 - math.log(2.0))]
    out = vae_loss(x_hat, x, mean, logvar, beta=3.0, recon_scale=2.0)
    assert out["recon"].item() == pytest.approx(sum(sse) / 2)
    assert out["kl"].item() == pytest.approx(sum(kl) / 2)
    expected = sum(2.0 * s + 3.0 * k for s, k in zip(sse, kl, strict=True)) / 2
    assert out["loss"].item() == pytest.approx(expected)


def test_vae_loss_bernoulli_by_hand():
    x = torch.tensor([[1.0, -1.0, 0.0]])  # targets (x + 1) / 2 = [1, 0, 0.5]
    logits = torch.tensor([[2.0, 0.5, -1.0]])
    mean, logvar = torch.zeros(1, 2), torch.zeros(1, 2)

    def bce(p_logit, target):
        p = 1 / (1 + math.exp(-p_logit))
        return -(target * math.log(p) + (1 - target) * math.log(1 - p))

    expected = bce(2.0, 1.0) + bce(0.5, 0.0) + bce(-1.0, 0.5)
    out = vae_loss(logits, x, mean, logvar, decoder="bernoulli")
    assert out["recon"].item() == pytest.approx(expected, rel=1e-5)
    assert out["kl"].item() == 0.0
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_vae_loss_rejects_unknown_decoder():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="decoder"):
        vae_loss(z, z, z, z, decoder="laplace")
