"""Classic autoencoder family: each term against a hand computation or torch.autograd (eq. 1-4, 6-7, 10)."""

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from pipeline.models import build_model
from pipeline.objectives import get_objective
from pipeline.objectives.autoencoder import (
    annealed_k,
    bits_per_dim,
    contractive_penalty,
    contractive_penalty_sigmoid,
    corrupt,
    decoder_nll,
    gaussian_decoder_scale,
    gaussian_kl,
    kl_sparsity,
    ksparse,
    log_normal_diag,
    reconstruction_sse,
    reparameterize,
    topk_mask,
)


def test_reconstruction_sse_by_hand():
    x = torch.tensor([[[[1.0, -1.0]]], [[[0.0, 0.5]]]])
    x_hat = torch.tensor([[[[0.0, -1.0]]], [[[1.0, 0.0]]]])
    torch.testing.assert_close(reconstruction_sse(x_hat, x), torch.tensor([1.0, 1.25]))


def test_kl_sparsity_matches_hand_formula_and_bernoulli_kl():
    rho, rho_hat = 0.1, torch.tensor([0.1, 0.5, 0.02, 0.9])

    def kl(r, q):
        return r * math.log(r / q) + (1 - r) * math.log((1 - r) / (1 - q))

    expected = sum(kl(rho, float(q)) for q in rho_hat)
    assert kl_sparsity(rho, rho_hat).item() == pytest.approx(expected, rel=1e-5)
    by_torch = kl_divergence(Bernoulli(probs=torch.full((4,), rho)), Bernoulli(probs=rho_hat)).sum()
    assert kl_sparsity(rho, rho_hat).item() == pytest.approx(by_torch.item(), rel=1e-5)
    assert kl_sparsity(rho, torch.full((3,), rho)).item() == pytest.approx(0.0, abs=1e-7)
    assert torch.isfinite(kl_sparsity(rho, torch.tensor([0.0, 1.0])))  # clamped, not inf
    with pytest.raises(ValueError, match="rho"):
        kl_sparsity(1.5, rho_hat)


def test_kl_sparsity_gradient_pushes_mean_activation_towards_rho():
    rho_hat = torch.tensor([0.5, 0.01], requires_grad=True)
    kl_sparsity(0.05, rho_hat).backward()
    assert rho_hat.grad[0] > 0 and rho_hat.grad[1] < 0  # descent lowers the busy unit, raises the idle one


def test_topk_mask_and_gradient_only_through_kept_units():
    z = torch.tensor([[0.3, -2.0, 5.0, 1.0, 0.2], [4.0, 3.0, -1.0, 0.0, 2.5]], requires_grad=True)
    mask = topk_mask(z, 2)
    assert mask.tolist() == [[False, False, True, True, False], [True, True, False, False, False]]
    out = ksparse(z, 2)
    torch.testing.assert_close(out.detach(), torch.where(mask, z, torch.zeros_like(z)).detach())
    w = torch.arange(10.0).view(2, 5)
    (out * w).sum().backward()
    torch.testing.assert_close(z.grad, torch.where(mask, w, torch.zeros_like(w)))  # zero for dropped units
    with pytest.raises(ValueError, match="k must be"):
        topk_mask(z, 6)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_ksparse_keeps_exactly_the_topk_values_of_each_row(k):
    gen = torch.Generator().manual_seed(k)
    z = torch.randn(64, 12, generator=gen, dtype=torch.float64) - 0.5  # mostly negative: top-k by value, not |z|
    z.requires_grad_(True)
    out = ksparse(z, k)
    nonzero = out.detach() != 0
    assert nonzero.sum(1).tolist() == [k] * 64  # exactly k kept per row (not k overall, not k per column)
    top = z.detach().topk(k, dim=1)
    kept = torch.where(nonzero, out.detach(), torch.full_like(z, float("-inf"))).sort(1, descending=True).values
    torch.testing.assert_close(kept[:, :k], top.values, rtol=0, atol=0)  # the kept values are the top-k, unscaled
    torch.testing.assert_close(nonzero, torch.zeros_like(nonzero).scatter(1, top.indices, True))
    w = torch.randn(64, 12, generator=gen, dtype=torch.float64)
    (out * w).sum().backward()
    torch.testing.assert_close(z.grad, torch.where(nonzero, w, torch.zeros_like(w)), rtol=0, atol=0)


def test_annealed_k_falls_linearly_to_k():
    assert [annealed_k(10, 100, s, 90) for s in (0, 45, 90, 500)] == [100, 55, 10, 10]
    assert annealed_k(10, 100, 0, 0) == 10


def test_masking_corruption_fraction_and_fill():
    x = torch.rand(200, 1, 16, 16) * 0.5 + 0.25  # never equal to the fill value -1
    gen = torch.Generator().manual_seed(0)
    xt = corrupt(x, "mask", 0.3, gen)
    dropped = xt == -1.0
    assert abs(dropped.float().mean().item() - 0.3) < 0.01  # 51200 Bernoulli(0.3) draws
    torch.testing.assert_close(xt[~dropped], x[~dropped])  # the rest untouched
    again = corrupt(x, "mask", 0.3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(xt, again)  # reproducible from the generator


def test_gaussian_corruption_std():
    x = torch.zeros(100, 1, 16, 16)
    xt = corrupt(x, "gaussian", 0.4, torch.Generator().manual_seed(1))
    noise = xt - x
    assert abs(noise.std().item() - 0.4) < 0.01 and abs(noise.mean().item()) < 0.01
    with pytest.raises(ValueError, match="corruption"):
        corrupt(x, "blur", 0.1)
    with pytest.raises(ValueError, match="masking level"):
        corrupt(x, "mask", 1.0)


def _jacobian_fro2(encoder, x):
    """||J||_F^2 per sample by torch.autograd.functional.jacobian, one sample at a time."""
    out = []
    for xi in x:
        j = torch.autograd.functional.jacobian(lambda v: encoder(v.unsqueeze(0))[0], xi)
        out.append(j.pow(2).sum())
    return torch.stack(out)


def test_contractive_penalty_closed_form_matches_autograd_jacobian():
    torch.manual_seed(0)
    ae = build_model("mlp_ae", image_size=4, latent=5, code_activation="sigmoid")
    assert ae.single_sigmoid_layer
    x = torch.randn(3, 1, 4, 4)
    expected = _jacobian_fro2(ae.encode, x)
    h = ae.encode(x)
    torch.testing.assert_close(contractive_penalty_sigmoid(h, ae.encoder[0].weight), expected)
    generic, h2 = contractive_penalty(ae.encode, x)
    torch.testing.assert_close(generic, expected)
    torch.testing.assert_close(h2, h)


def test_contractive_penalty_of_deep_encoder_matches_autograd_and_trains():
    torch.manual_seed(0)
    ae = build_model("mlp_ae", image_size=4, hidden=[7], latent=3, activation="tanh", code_activation="sigmoid")
    x = torch.randn(4, 1, 4, 4)
    pen, _ = contractive_penalty(ae.encode, x)
    torch.testing.assert_close(pen, _jacobian_fro2(ae.encode, x))
    pen.sum().backward()  # create_graph: the penalty is differentiable in the weights
    assert ae.encoder[0].weight.grad is not None and ae.encoder[0].weight.grad.abs().sum() > 0


def test_cae_objective_uses_closed_form_only_for_one_sigmoid_layer():
    torch.manual_seed(0)
    cae = get_objective("cae")
    deep = build_model("mlp_ae", image_size=4, hidden=[6], latent=3)
    with pytest.raises(ValueError, match="closed_form"):
        cae.penalty(deep, torch.randn(2, 1, 4, 4), "closed_form")
    one = build_model("mlp_ae", image_size=4, latent=3)
    x = torch.randn(2, 1, 4, 4)
    a, _ = cae.penalty(one, x, "closed_form")
    b, _ = cae.penalty(one, x, "autograd")
    torch.testing.assert_close(a, b)


def test_gaussian_kl_matches_torch_distributions_on_vectors():
    torch.manual_seed(1)
    mean, logvar = torch.randn(6, 8), torch.randn(6, 8)
    expected = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(gaussian_kl(mean, logvar), expected)


def test_reparameterisation_gradients_flow_to_mean_and_logvar():
    mean = torch.tensor([[1.0, -2.0]], requires_grad=True)
    logvar = torch.tensor([[0.0, math.log(4.0)]], requires_grad=True)
    eps = torch.tensor([[0.5, -1.0]])
    z = reparameterize(mean, logvar, eps)
    torch.testing.assert_close(z.detach(), torch.tensor([[1.5, -4.0]]))
    z.sum().backward()
    torch.testing.assert_close(mean.grad, torch.ones(1, 2))  # dz/dmu = 1
    torch.testing.assert_close(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)  # dz/dlogvar


def test_log_normal_and_decoder_nll_match_torch_distributions():
    torch.manual_seed(2)
    z, mean, logvar = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    expected = Normal(mean, (0.5 * logvar).exp()).log_prob(z).sum(1)
    torch.testing.assert_close(log_normal_diag(z, mean, logvar), expected)
    x, x_hat = torch.rand(3, 1, 2, 2) * 2 - 1, torch.randn(3, 1, 2, 2)
    nll = decoder_nll(x_hat, x, "gaussian", sigma=0.3)
    torch.testing.assert_close(nll, -Normal(x_hat, 0.3).log_prob(x).flatten(1).sum(1))
    binary = (torch.rand(3, 1, 2, 2) > 0.5).float() * 2 - 1
    torch.testing.assert_close(decoder_nll(x_hat, binary, "bernoulli"),
                               -Bernoulli(logits=x_hat).log_prob((binary + 1) / 2).flatten(1).sum(1))
    assert gaussian_decoder_scale(0.5) == pytest.approx(2.0)
    assert bits_per_dim(256 * math.log(2.0), 256) == pytest.approx(1.0)


def test_vae_bounds_order_and_exact_posterior():
    """-log p(x) <= IW bound <= -ELBO; on a linear-Gaussian model with an exact posterior all three agree."""
    torch.manual_seed(0)
    vae = build_model("mlp_vae", image_size=2, hidden=[], latent=1)
    obj = get_objective("vae")
    cfg = {"decoder": "gaussian", "sigma": 0.5, "eval_samples": 4000, "iw_samples": 50}
    x = torch.randn(5, 1, 2, 2)
    b = obj.bounds(vae, x, cfg, torch.Generator().manual_seed(0))
    assert torch.all(b["nll_iw"] <= b["neg_elbo"] + 1e-3)
    # exact: x = W z + c + 0.5 noise with z ~ N(0, 1) is Gaussian with covariance W W^T + 0.25 I; set q to the
    # true posterior N(m, s^2): s^2 = 1 / (1 + |W|^2 / 0.25), m = s^2 W^T (x - c) / 0.25
    dec = vae.decoder[0]
    w, c = dec.weight[:, 0].detach(), dec.bias.detach()
    s2 = 1.0 / (1.0 + w.dot(w) / 0.25)
    with torch.no_grad():
        enc = vae.encoder[0]
        enc.weight.zero_()
        enc.weight[0] = s2 * w / 0.25
        enc.bias.zero_()
        enc.bias[0] = -(s2 * w / 0.25).dot(c)
        enc.bias[1] = math.log(s2)
    b = obj.bounds(vae, x, cfg, torch.Generator().manual_seed(0))
    cov = torch.outer(w, w) + 0.25 * torch.eye(4)
    true_nll = -torch.distributions.MultivariateNormal(c, cov).log_prob(x.flatten(1))
    torch.testing.assert_close(b["nll_iw"], true_nll, atol=1e-4, rtol=1e-4)  # every weight p(x,z)/q(z|x) = p(x)
    torch.testing.assert_close(b["neg_elbo"], true_nll, atol=0.05, rtol=0)  # Monte Carlo over 4000 samples


def test_check_cfg_rejects_bad_keys_and_values():
    with pytest.raises(ValueError, match="unknown key"):
        get_objective("vae").check_cfg({"type": "vae", "betta": 4})
    with pytest.raises(ValueError, match="decoder"):
        get_objective("vae").check_cfg({"decoder": "laplace"})
    with pytest.raises(ValueError, match="rho"):
        get_objective("sae").check_cfg({"rho": 0.0})
    with pytest.raises(ValueError, match="`k`"):
        get_objective("ksparse").check_cfg({})
    with pytest.raises(ValueError, match="corruption"):
        get_objective("dae").check_cfg({"corruption": "blur"})
    get_objective("dae").check_cfg({"type": "dae", "corruption": "gaussian", "level": 0.5})


def test_sae_needs_a_sigmoid_code():
    relu = build_model("mlp_ae", image_size=4, latent=3, code_activation="relu")
    with pytest.raises(ValueError, match="sigmoid"):
        get_objective("sae").loss(relu, {"image": torch.zeros(2, 1, 4, 4)}, torch.Generator(), {})


def _fit(objective: str, model: torch.nn.Module, cfg: dict, steps: int, lr: float = 3e-3) -> tuple[float, float]:
    """(first, last) reconstruction MSE of training `model` on a fixed tiny batch of 16 images."""
    obj = get_objective(objective)
    obj.check_cfg(cfg)
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(16, 1, 8, 8, generator=gen) > 0.6).float() * 2 - 1
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    mses = []
    for _ in range(steps):
        loss, parts = obj.loss(model, {"image": x}, gen, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            if objective == "vae":
                recon = obj.pixels(model.decode(model.encode(x)[0]), cfg.get("decoder", "gaussian"))
            elif objective == "ksparse":
                recon = model.decode(ksparse(model.encode(x), cfg["k"]))
            else:
                recon = model(x)[0]
            mses.append(float(((recon - x) ** 2).mean()))
    return mses[0], mses[-1]


@pytest.mark.parametrize("objective,args,cfg", [
    ("ae", {"hidden": [32], "latent": 16, "code_activation": "linear"}, {}),
    ("dae", {"hidden": [32], "latent": 16, "code_activation": "linear"}, {"corruption": "mask", "level": 0.2}),
    ("dae", {"hidden": [32], "latent": 16, "code_activation": "linear"}, {"corruption": "gaussian", "level": 0.2}),
    ("sae", {"latent": 32}, {"rho": 0.1, "beta": 0.5}),
    ("ksparse", {"latent": 32, "code_activation": "linear", "tied_init": True}, {"k": 8}),
    ("cae", {"latent": 32}, {"lam": 0.01}),
    ("cae", {"hidden": [32], "latent": 16}, {"lam": 0.01, "jacobian": "autograd"}),
])
def test_each_autoencoder_learns_a_tiny_batch(objective, args, cfg):
    torch.manual_seed(0)
    model = build_model("mlp_ae", image_size=8, **args)
    first, last = _fit(objective, model, cfg, steps=100)
    assert last < 0.4 * first, (first, last)


@pytest.mark.parametrize("decoder", ["gaussian", "bernoulli"])
def test_vae_learns_a_tiny_batch(decoder):
    torch.manual_seed(0)
    model = build_model("mlp_vae", image_size=8, hidden=[64], latent=4)
    first, last = _fit("vae", model, {"decoder": decoder, "sigma": 0.2, "beta": 0.1}, steps=80)
    assert last < 0.5 * first, (first, last)


def test_sae_drives_mean_activation_towards_rho():
    torch.manual_seed(0)
    model = build_model("mlp_ae", image_size=8, latent=32)
    obj = get_objective("sae")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 8, 8, generator=gen) * 2 - 1
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss, parts = obj.loss(model, {"image": x}, gen, {"rho": 0.05, "beta": 50.0})
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert abs(model.encode(x).mean().item() - 0.05) < 0.02  # started near 0.5


def test_ksparse_counts_updates_and_anneals_k():
    model = build_model("mlp_ae", image_size=4, latent=10, code_activation="linear")
    obj = get_objective("ksparse")
    x = torch.randn(2, 1, 4, 4)
    ks = [obj.loss(model, {"image": x}, torch.Generator(), {"k": 2, "anneal_steps": 4})[1]["k"].item()
          for _ in range(6)]
    assert ks == [10, 8, 6, 4, 2, 2]
    assert int(model.num_updates) == 6
    model.eval()
    obj.loss(model, {"image": x}, torch.Generator(), {"k": 2})
    assert int(model.num_updates) == 6  # evaluation does not count


def test_code_stats_and_filters_png_by_hand():
    from pipeline.objectives.classic import code_stats, filters_png

    h = torch.tensor([[0.0, 0.5, 0.0], [0.0, -1.0, 0.02]])
    s = code_stats(h, threshold=0.05)
    assert s["eval/mean_activation"] == pytest.approx(-0.48 / 6)
    assert s["eval/mean_abs_activation"] == pytest.approx(1.52 / 6)
    assert s["eval/frac_near_zero"] == pytest.approx(4 / 6)
    assert s["eval/dead_units"] == pytest.approx(2 / 3)  # units 0 and 2 are near zero on every sample
    png = filters_png(torch.randn(10, 1, 4, 4))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits8(tmp_path_factory):
    from pipeline.data import build_dataset

    d = tmp_path_factory.mktemp("digits8")
    build_dataset("digits", d, image_size=8, held_out=0.15, shard_size=512, seed=0)
    return d


@pytest.mark.parametrize("objective,model,args,cfg,extra", [
    ("dae", "mlp_ae", {"latent": 8}, {"corruption": "gaussian", "level": 0.3},
     {"eval/corrupted_mse", "eval/denoised_mse", "eval/dead_units"}),
    ("ksparse", "mlp_ae", {"latent": 16, "code_activation": "linear"}, {"k": 4}, {"eval/frac_near_zero"}),
    ("cae", "mlp_ae", {"latent": 8}, {"lam": 0.1}, {"eval/jacobian_fro2"}),
    ("vae", "mlp_vae", {"latent": 3, "hidden": [16]}, {"decoder": "bernoulli", "iw_samples": 4, "eval_samples": 2},
     {"eval/neg_elbo", "eval/nll_iw", "eval/neg_elbo_bpd", "eval/nll_iw_bpd", "eval/kl", "eval/active_units"}),
])
def test_evaluators_report_metrics_and_images(digits8, objective, model, args, cfg, extra):
    from pipeline.data import load_split

    torch.manual_seed(0)
    m = build_model(model, image_size=8, **args).eval()
    metrics, images = get_objective(objective).evaluate(m, digits8, cfg, seed=0)
    assert {"eval/recon_mse", "eval/mean_image_mse", "eval/psnr", "eval/recon_ratio"} | extra <= set(metrics)
    x = torch.from_numpy(load_split(digits8, "test")["image"])
    assert metrics["eval/mean_image_mse"] == pytest.approx(float(((x - x.mean(0)) ** 2).mean()), rel=1e-5)
    assert metrics["eval/recon_ratio"] == pytest.approx(metrics["eval/recon_mse"] / metrics["eval/mean_image_mse"])
    assert images and all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in images.values())
    if objective == "ksparse":  # the code the evaluator decodes, rebuilt here with torch.topk and scatter
        with torch.no_grad():
            h = m.encode(x)
            top = h.topk(4, dim=1)
            code = torch.zeros_like(h).scatter(1, top.indices, top.values)
            recon = m.decode(code)
        near = code.abs() < 1e-6
        assert metrics["eval/frac_near_zero"] == pytest.approx(float(near.float().mean()), abs=1e-7)
        assert metrics["eval/frac_near_zero"] == pytest.approx(1 - 4 / 16, abs=1e-3)  # exactly k kept per row
        assert metrics["eval/dead_units"] == pytest.approx(float(near.all(0).float().mean()), abs=1e-7)
        assert metrics["eval/mean_activation"] == pytest.approx(float(code.mean()), rel=1e-5, abs=1e-7)
        assert metrics["eval/recon_mse"] == pytest.approx(float(((recon - x) ** 2).mean()), rel=1e-5)
        assert "samples/filters.png" in images
    if objective == "vae":
        assert {"samples/prior_samples.png", "samples/traversals.png"} <= set(images)
        assert metrics["eval/nll_iw_bpd"] == pytest.approx(metrics["eval/nll_iw"] / (64 * math.log(2)))


def test_vae_evaluator_reports_mig_when_the_split_has_factors(tmp_path):
    from pipeline.data import build_dataset, load_split

    disentangle = pytest.importorskip("pipeline.eval.disentangle")
    build_dataset("sprites", tmp_path, image_size=12, held_out=0.1, shard_size=4096, seed=0)
    split = load_split(tmp_path, "test")
    assert "factors" in split
    torch.manual_seed(0)
    vae = build_model("mlp_vae", image_size=12, hidden=[16], latent=3).eval()
    metrics, _ = get_objective("vae").evaluate(vae, tmp_path, {"iw_samples": 2, "eval_samples": 1}, seed=0)
    with torch.no_grad():
        mean, _ = vae.encode(torch.from_numpy(split["image"]))
    assert metrics["eval/mig"] == pytest.approx(disentangle.mig(mean.numpy(), split["factors"]))
