"""Fully connected AE / VAE: shapes, code activations, filters, tied initialisation, export round trip."""

import pytest
import torch

from pipeline.models import MODEL_REGISTRY, build_model
from pipeline.models.mlp_ae import LOGVAR_MAX, LOGVAR_MIN, MLPVAE, MLPAutoencoder
from pipeline.train.export import export_weights, load_exported


def test_registered_and_shapes():
    assert MODEL_REGISTRY["mlp_ae"] is MLPAutoencoder and MODEL_REGISTRY["mlp_vae"] is MLPVAE
    ae = build_model("mlp_ae", in_channels=3, image_size=8, hidden=[20, 10], latent=6)
    x = torch.randn(5, 3, 8, 8)
    recon, h = ae(x)
    assert recon.shape == x.shape and h.shape == (5, 6)
    assert ae.filters.shape == (20, 3, 8, 8)
    torch.testing.assert_close(ae.filters[2].flatten(), ae.encoder[0].weight[2])  # rows as images
    vae = build_model("mlp_vae", in_channels=3, image_size=8, hidden=[16], latent=4)
    out, mean, logvar = vae(x)
    assert out.shape == x.shape and mean.shape == logvar.shape == (5, 4)
    assert vae.decode(torch.randn(2, 4)).shape == (2, 3, 8, 8)


@pytest.mark.parametrize("act,lo,hi", [("sigmoid", 0.0, 1.0), ("relu", 0.0, float("inf")), ("tanh", -1.0, 1.0)])
def test_code_activation_ranges(act, lo, hi):
    ae = build_model("mlp_ae", image_size=4, latent=8, code_activation=act)
    h = ae.encode(torch.randn(50, 1, 4, 4) * 5)
    assert h.min() >= lo and h.max() <= hi
    assert ae.single_sigmoid_layer == (act == "sigmoid")
    linear = build_model("mlp_ae", image_size=4, latent=8, code_activation="linear")
    x = torch.randn(3, 1, 4, 4)
    torch.testing.assert_close(linear.encode(x), x.flatten(1) @ linear.encoder[0].weight.T + linear.encoder[0].bias)


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="code_activation 'softplus'"):
        build_model("mlp_ae", code_activation="softplus")
    with pytest.raises(ValueError, match="unknown argument"):
        build_model("mlp_ae", latnet=3)


def test_tied_init_transposes_the_mirrored_encoder_layers():
    ae = build_model("mlp_ae", image_size=4, hidden=[7], latent=3, tied_init=True)
    enc = [m for m in ae.encoder if isinstance(m, torch.nn.Linear)]
    dec = [m for m in ae.decoder if isinstance(m, torch.nn.Linear)]
    torch.testing.assert_close(dec[0].weight, enc[1].weight.T)
    torch.testing.assert_close(dec[1].weight, enc[0].weight.T)
    assert dec[0].weight.data_ptr() != enc[1].weight.data_ptr()  # initialised, not shared


def test_vae_sampling_is_seeded_and_logvar_clamped():
    torch.manual_seed(0)
    vae = MLPVAE(image_size=4, hidden=[8], latent=2)
    x = torch.randn(3, 1, 4, 4)
    with torch.no_grad():
        a = vae(x, generator=torch.Generator().manual_seed(1))[0]
        b = vae(x, generator=torch.Generator().manual_seed(1))[0]
        c = vae(x, sample=False)[0]
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, c)
        torch.testing.assert_close(c, vae.decode(vae.encode(x)[0]))
        _, logvar = vae.encode(x * 1e6)
    assert logvar.min() >= LOGVAR_MIN and logvar.max() <= LOGVAR_MAX


def test_export_round_trip_keeps_weights_and_update_count(tmp_path):
    ae = build_model("mlp_ae", image_size=4, latent=3, code_activation="linear")
    ae.num_updates += 17
    export_weights(ae.state_dict(), "mlp_ae", {"image_size": 4, "latent": 3, "code_activation": "linear"}, tmp_path)
    loaded, meta = load_exported(tmp_path)
    assert meta["name"] == "mlp_ae" and int(loaded.num_updates) == 17
    x = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(loaded(x)[0], ae(x)[0])
