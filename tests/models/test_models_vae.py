"""KL autoencoder: shapes, posterior, reparameterisation, overfitting a tiny batch."""

import torch

from pipeline.models import KLAutoencoder, build_model
from pipeline.models.autoencoder import LOGVAR_MAX, LOGVAR_MIN
from pipeline.objectives.autoencoder import vae_loss


def test_shapes_and_downsample_factor():
    torch.manual_seed(0)
    vae = build_model("kl_vae", in_channels=3, base_channels=16, channel_mult=(1, 2, 2), latent_channels=4)
    assert isinstance(vae, KLAutoencoder)
    assert vae.downsample_factor == 4 and vae.latent_channels == 4
    x = torch.randn(2, 3, 16, 16)
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (2, 4, 4, 4)
    assert vae.decode(mean).shape == x.shape
    x_hat, m, lv = vae(x)
    assert x_hat.shape == x.shape and m.shape == mean.shape and lv.shape == logvar.shape


def test_sampling_and_logvar_clamp():
    torch.manual_seed(0)
    vae = KLAutoencoder(base_channels=16)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        a, _, _ = vae(x, sample=False)
        b, _, _ = vae(x, sample=False)
        c, _, _ = vae(x, sample=True)
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, c)
        _, logvar = vae.encode(x * 1e8)
    assert logvar.min() >= LOGVAR_MIN and logvar.max() <= LOGVAR_MAX


def test_reparameterize_statistics():
    torch.manual_seed(0)
    mean, logvar = torch.full((20000,), 2.0), torch.full((20000,), 2 * torch.log(torch.tensor(3.0)))
    z = KLAutoencoder.reparameterize(mean, logvar)
    assert abs(z.mean().item() - 2.0) < 0.1 and abs(z.std().item() - 3.0) < 0.1


def test_overfits_tiny_batch():
    torch.manual_seed(0)
    vae = KLAutoencoder(in_channels=1, base_channels=16, latent_channels=4)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(120):
        x_hat, mean, logvar = vae(x)
        loss = vae_loss(x_hat, x, mean, logvar, beta=1e-3)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
