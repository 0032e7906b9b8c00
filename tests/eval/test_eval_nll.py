"""`pipeline eval nll`: the full-VLB bits/dim of held-out data under a registered diffusion model."""

from __future__ import annotations

import math

import torch

from pipeline.cli import main
from pipeline.data import load_split
from pipeline.eval import Generator
from pipeline.eval.likelihood import generator_nll, model_inputs, quantize_8bit
from pipeline.models import build_model
from pipeline.stages import load_generator


def _test_images(store, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    test = load_split(store.data_dir, "test")
    return torch.from_numpy(test["image"][:n]), torch.from_numpy(test["label"][:n])


def test_trained_pixel_model_has_lower_bits_per_dim_than_untrained(tiny_store):
    x, y = _test_images(tiny_store, 48)
    trained = generator_nll(load_generator(tiny_store.dirs["tiny-ddpm"]), x, y, seed=0)
    untrained = generator_nll(load_generator(tiny_store.dirs["tiny-ddpm-untrained"]), x, y, seed=0)
    assert (trained.space, trained.decoder, trained.dims) == ("pixel", "discretized", 64)
    assert math.isfinite(trained.bits_per_dim) and math.isfinite(untrained.bits_per_dim)
    assert trained.bits_per_dim > 0  # a bound on a discrete NLL cannot be negative
    # measured ≈ 4.8 vs ≈ 7.0 bits/dim
    assert trained.bits_per_dim < untrained.bits_per_dim - 1.0, (trained.bits_per_dim, untrained.bits_per_dim)
    assert trained.per_example.shape == (48,)


def test_nll_is_reproducible_and_conditional_uses_labels(tiny_store):
    gen = load_generator(tiny_store.dirs["tiny-ddpm"])
    x, y = _test_images(tiny_store, 16)
    a = generator_nll(gen, x, y, seed=3, batch_size=16)
    b = generator_nll(gen, x, y, seed=3, batch_size=16)
    c = generator_nll(gen, x, y, seed=3, batch_size=16, conditional=True)
    assert torch.equal(a.per_example, b.per_example)
    assert c.conditional and not a.conditional and not torch.equal(a.per_example, c.per_example)


def test_latent_model_is_measured_on_scaled_latents_with_gaussian_decoder():
    torch.manual_seed(0)
    ae = build_model("kl_vae", in_channels=1, base_channels=8, channel_mult=[1, 2], latent_channels=2).eval()
    unet = build_model("unet", in_channels=2, model_channels=8, channel_mult=[1], attention_resolutions=[],
                       num_classes=10).eval()
    extra = {"kind": "diffusion", "num_classes": 10, "sample_shape": [2, 4, 4], "latent_scale": 0.5,
             "autoencoder": "models:/ae@champion", "diffusion": {"schedule": "cosine", "timesteps": 8}}
    gen = Generator(unet, {"extra": extra}, decoder=ae)
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    z, space, decoder = model_inputs(gen, images)
    with torch.no_grad():
        expected = ae.encode(images)[0] * 0.5
    assert (space, decoder) == ("latent", "gaussian")
    torch.testing.assert_close(z, expected)
    r = generator_nll(gen, images)
    assert r.space == "latent" and r.dims == 32 and math.isfinite(r.bits_per_dim)


def test_quantize_8bit_snaps_to_bin_centres():
    x = torch.tensor([-1.2, -1.0, -0.999, 0.01, 0.5, 0.997, 1.0, 1.3])
    q = quantize_8bit(x)
    # (x + 1) * 127.5 = [-25.5 → 0, 0, 0.13, 128.78, 191.25, 254.6, 255, 293.25 → 255]: the nearest of the
    # 256 levels k, at k / 127.5 - 1
    levels = torch.tensor([0.0, 0.0, 0.0, 129.0, 191.0, 255.0, 255.0, 255.0])
    torch.testing.assert_close(q, levels / 127.5 - 1.0)


def _nll_runs(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny")
    return client.search_runs([exp.experiment_id], f"tags.`pipeline.model_name` = '{name}'")


def test_eval_nll_command_logs_lower_bits_per_dim_for_trained_model(tiny_mlflow, capsys):
    store = tiny_mlflow
    values = {}
    for name in ("tiny-ddpm", "tiny-ddpm-untrained"):
        rc = main(["eval", "nll", f"models:/{name}@champion", "--data", str(store.data_dir), "--split", "test",
                   "--num", "24", "--tracking-uri", store.uri])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert "bits/dim of the 8-bit pixels" in out
        (run,) = _nll_runs(store.uri, name)
        assert run.data.tags["pipeline.eval"] == "nll"
        assert run.data.tags["pipeline.input.model"] == f"models:/{name}/1"
        assert run.data.params["num"] == "24" and run.data.params["decoder"] == "discretized"
        values[name] = run.data.metrics["nll/bits_per_dim"]
        assert math.isfinite(values[name])
        from mlflow.tracking import MlflowClient

        mv = MlflowClient(store.uri).get_model_version(name, "1")
        assert mv.tags["pipeline.eval.nll_run"] == run.info.run_id
    assert values["tiny-ddpm"] < values["tiny-ddpm-untrained"] - 1.0, values
