"""KL, likelihoods, learned variance, VLB terms and training losses (eq. 25-31, 35)."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from pipeline.diffusion import (
    Schedule,
    decoder_nll,
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    importance_timesteps,
    init_loss_history,
    learned_log_variance,
    normal_kl,
    p_mean_variance,
    prior_bpd,
    training_target,
    uniform_timesteps,
    update_loss_history,
    vlb_terms,
)

F64 = torch.float64


def test_normal_kl_identical_is_zero():
    m = torch.randn(5, 3, dtype=F64)
    lv = torch.randn(5, 3, dtype=F64)
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros_like(m), atol=1e-15)


def test_normal_kl_matches_torch_and_monte_carlo():
    m1, lv1, m2, lv2 = (torch.tensor(v, dtype=F64) for v in (0.3, math.log(0.5), -0.4, math.log(2.0)))
    kl = normal_kl(m1, lv1, m2, lv2).item()
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    assert kl == pytest.approx(ref.item(), rel=1e-12)
    gen = torch.Generator().manual_seed(0)
    x = m1 + (0.5 * lv1).exp() * torch.randn(400_000, generator=gen, dtype=F64)
    log_ratio = torch.distributions.Normal(m1, (0.5 * lv1).exp()).log_prob(x) - torch.distributions.Normal(
        m2, (0.5 * lv2).exp()
    ).log_prob(x)
    se = log_ratio.std().item() / math.sqrt(len(x))
    assert abs(log_ratio.mean().item() - kl) < 5 * se


def test_discretized_likelihood_is_a_distribution_over_256_bins():
    grid = torch.linspace(-1, 1, 256, dtype=F64)
    for mean, log_scale in [(0.0, math.log(0.1)), (0.9, math.log(0.01)), (-0.3, math.log(3.0))]:
        lp = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, mean), torch.full_like(grid, log_scale))
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_likelihood_matches_scipy_and_is_stable():
    x = torch.tensor([-1.0, -0.5, 0.0, 127 / 127.5 - 1, 1.0], dtype=F64)
    mean = torch.tensor([0.1, -0.45, 0.02, 0.3, 0.9], dtype=F64)
    scale = torch.tensor([0.2, 0.05, 0.01, 0.5, 0.3], dtype=F64)
    lp = discretized_gaussian_log_likelihood(x, mean, scale.log()).numpy()
    xs, ms, ss = x.numpy(), mean.numpy(), scale.numpy()
    hi = norm.cdf((xs + 1 / 255 - ms) / ss)
    lo = norm.cdf((xs - 1 / 255 - ms) / ss)
    ref = np.log(np.where(xs < -0.999, hi, np.where(xs > 0.999, 1 - lo, hi - lo)))
    np.testing.assert_allclose(lp, ref, rtol=1e-9)
    # Far tails: finite, and the edge bins use log Φ (not log of an underflowed difference).
    far = discretized_gaussian_log_likelihood(
        torch.tensor([-1.0, 1.0, 0.0], dtype=F64),
        torch.tensor([1.0, -1.0, 1.0], dtype=F64),
        torch.full((3,), math.log(0.01), dtype=F64),
    )
    assert torch.isfinite(far).all()
    assert far[0].item() == pytest.approx(norm.logcdf((-1 + 1 / 255 - 1) / 0.01), rel=1e-9)


def test_learned_log_variance_interpolates_eq35():
    s = Schedule.make("linear", 100)
    t = torch.tensor([0, 5, 99])
    ones = torch.ones(3, 2, dtype=F64)
    hi = learned_log_variance(s, ones, t)
    lo = learned_log_variance(s, -ones, t)
    assert torch.allclose(hi[:, 0], s.betas[t].log())
    assert torch.allclose(lo[:, 0], s.posterior_log_variance_clipped[t])
    mid = learned_log_variance(s, 0.5 * ones, t)  # v' = 0.75
    assert torch.allclose(mid[:, 0], 0.75 * s.betas[t].log() + 0.25 * s.posterior_log_variance_clipped[t])


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_p_mean_variance_with_true_prediction_is_posterior(param):
    s = Schedule.make("linear", 100)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 2, generator=gen, dtype=F64)
    eps = torch.randn(8, 2, generator=gen, dtype=F64)
    t = torch.randint(0, 100, (8,), generator=gen)
    xt = s.q_sample(x0, t, eps)
    out = training_target(s, x0, t, eps, param)
    p = p_mean_variance(s, out, xt, t, param, var_type="beta_tilde")
    mean, var, logvar = s.q_posterior(x0, xt, t)
    assert torch.allclose(p["mean"], mean, atol=1e-9)
    assert torch.allclose(p["variance"], var) and torch.allclose(p["log_variance"], logvar)
    # eq. 27 directly for the ε form of the mean.
    a = s.alphas[t].reshape(-1, 1)
    acp = s.alphas_cumprod[t].reshape(-1, 1)
    assert torch.allclose(p["mean"], (xt - (1 - a) / (1 - acp).sqrt() * eps) / a.sqrt(), atol=1e-9)
    pb = p_mean_variance(s, out, xt, t, param, var_type="beta")
    assert torch.allclose(pb["variance"], s.betas[t].reshape(-1, 1).expand(8, 2))


def test_vlb_terms_kl_and_decoder():
    s = Schedule.make("linear", 50)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(6, 3, generator=gen, dtype=F64).clamp(-1, 1)
    xt = torch.randn(6, 3, generator=gen, dtype=F64)
    out = torch.randn(6, 3, generator=gen, dtype=F64)
    t = torch.tensor([0, 1, 2, 10, 30, 49])
    terms = vlb_terms(s, out, x0, xt, t, var_type="beta", decoder="gaussian")
    p = p_mean_variance(s, out, xt, t, "eps", var_type="beta")
    for i in range(1, 6):
        tm, _, tlv = s.q_posterior(x0[i : i + 1], xt[i : i + 1], t[i : i + 1])
        q = torch.distributions.Normal(tm, (0.5 * tlv).exp())
        pd = torch.distributions.Normal(p["mean"][i : i + 1], p["variance"][i : i + 1].sqrt())
        ref = torch.distributions.kl_divergence(q, pd).mean().item() / math.log(2)
        assert terms[i].item() == pytest.approx(ref, rel=1e-9)
    sd = p["variance"][0].sqrt()
    ref0 = -torch.distributions.Normal(p["mean"][0], sd).log_prob(x0[0]).mean().item() / math.log(2)
    assert terms[0].item() == pytest.approx(ref0, rel=1e-9)
    nll = decoder_nll(x0[:1], p["mean"][:1], p["log_variance"][:1], "discretized")
    assert torch.isfinite(nll).all()


def test_prior_bpd_closed_form():
    s = Schedule.make("linear", 1000)
    x0 = torch.tensor([[0.5, -1.0]], dtype=F64)
    acp = s.alphas_cumprod[-1].item()
    ref = np.mean([0.5 * (-1 - math.log(1 - acp) + (1 - acp) + acp * v**2) for v in (0.5, -1.0)]) / math.log(2)
    assert prior_bpd(s, x0).item() == pytest.approx(ref, rel=1e-9)
    assert ref < 1e-4  # the linear schedule ends close to N(0, I)


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_simple_loss_is_mse_on_the_target(param):
    s = Schedule.make("linear", 100)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(5, 2, generator=gen, dtype=F64)
    noise = torch.randn(5, 2, generator=gen, dtype=F64)
    t = torch.tensor([0, 3, 50, 98, 99])
    seen = {}

    def model_fn(x, tt):
        seen["x"], seen["t"] = x, tt
        return torch.zeros_like(x)

    res = diffusion_loss(model_fn, s, x0, t, noise, parameterization=param)
    target = {"eps": noise, "x0": x0, "v": None}[param]
    if target is None:
        acp = s.alphas_cumprod[t].reshape(-1, 1)
        target = acp.sqrt() * noise - (1 - acp).sqrt() * x0
    assert torch.allclose(res["mse"], (target**2).mean(1))
    assert torch.equal(res["loss"], res["mse"]) and torch.equal(res["vlb"], torch.zeros(5, dtype=F64))
    assert torch.allclose(seen["x"], s.q_sample(x0, t, noise)) and torch.equal(seen["t"], t)


def test_hybrid_loss_vlb_trains_only_the_variance():
    s = Schedule.make("linear", 100)
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(6, 2, generator=gen, dtype=F64)
    noise = torch.randn(6, 2, generator=gen, dtype=F64)
    t = torch.tensor([0, 1, 20, 40, 60, 99])
    out = (0.3 * torch.randn(6, 4, generator=gen, dtype=F64)).requires_grad_(True)
    res = diffusion_loss(lambda x, tt: out, s, x0, t, noise, loss_type="hybrid", learn_sigma=True, lambda_vlb=0.01)
    (g,) = torch.autograd.grad(res["loss"].sum(), out, retain_graph=True)
    (g_mse,) = torch.autograd.grad(res["mse"].sum(), out)
    assert torch.allclose(g[:, :2], g_mse[:, :2])  # the mean only gets the L_simple gradient
    assert g[:, 2:].abs().min() > 0  # the variance channels get the VLB gradient
    xt = s.q_sample(x0, t, noise)
    ref = vlb_terms(s, out.detach(), x0, xt, t, learn_sigma=True)
    assert torch.allclose(res["vlb"], ref)
    assert torch.allclose(res["loss"], res["mse"] + 0.01 * 100 * ref)


def test_uniform_timesteps_range_and_determinism():
    t1 = uniform_timesteps(10_000, 7, torch.Generator().manual_seed(0))
    t2 = uniform_timesteps(10_000, 7, torch.Generator().manual_seed(0))
    assert torch.equal(t1, t2) and t1.dtype == torch.long
    assert t1.min() == 0 and t1.max() == 6
    assert torch.bincount(t1).min() > 1300


def test_importance_sampler():
    h = init_loss_history(4, history_per_term=2)
    t, w = importance_timesteps(h, 100, torch.Generator().manual_seed(0))
    assert torch.equal(w, torch.ones(100, dtype=F64))
    h2 = update_loss_history(h, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), torch.tensor([1.0, 1, 1, 1, 1, 2, 3, 4]))
    assert torch.equal(h.counts, torch.zeros(4, dtype=torch.long))  # the input is not modified
    h3 = update_loss_history(h2, torch.tensor([0]), torch.tensor([5.0]))  # drops the oldest value at t=0
    assert h3.values[0].tolist() == [1.0, 25.0]
    gen = torch.Generator().manual_seed(1)
    t, w = importance_timesteps(h3, 200_000, gen, uniform_prob=0.0)
    rms = torch.tensor([math.sqrt(13), math.sqrt(2.5), math.sqrt(5), math.sqrt(8.5)], dtype=F64)
    probs = rms / rms.sum()
    freq = torch.bincount(t, minlength=4).double() / len(t)
    assert torch.allclose(freq, probs, atol=0.005)
    assert torch.allclose(w, 1 / (4 * probs[t]))
    # Weighted average of any per-t quantity is unbiased for its uniform mean.
    f = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    assert (w * f[t]).mean().item() == pytest.approx(2.5, rel=0.01)
