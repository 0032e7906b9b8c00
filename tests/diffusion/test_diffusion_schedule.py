"""Schedules, forward process and posterior (eq. 15-22, 34) against independent float64 computations."""

import math

import pytest
import torch

from pipeline.diffusion import Schedule, extract, strided_timesteps


def test_linear_schedule_endpoints_and_scaling():
    s = Schedule.make("linear", 1000)
    assert s.num_timesteps == 1000
    assert s.betas.dtype == torch.float64
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)
    assert torch.equal(s.timestep_map, torch.arange(1000))
    s4 = Schedule.make("linear", 250)  # scale = 1000 / T
    assert s4.betas[0].item() == pytest.approx(4e-4)
    assert s4.betas[-1].item() == pytest.approx(0.08)
    diffs = s4.betas.diff()
    assert torch.allclose(diffs, diffs[0].expand_as(diffs))


@pytest.mark.parametrize("T", [10, 1000])
def test_cosine_schedule_matches_eq34(T):
    s = Schedule.make("cosine", T)
    sh = 0.008

    def f(t):
        return math.cos((t / T + sh) / (1 + sh) * math.pi / 2) ** 2

    for t in range(1, T + 1):
        beta = min(1 - (f(t) / f(0)) / (f(t - 1) / f(0)), 0.999)
        assert s.betas[t - 1].item() == pytest.approx(beta, rel=1e-12, abs=1e-15)
    # Where nothing was clipped, ᾱ_t = f(t)/f(0) exactly.
    for t in range(1, T):
        assert s.alphas_cumprod[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-10)
    assert s.betas.max().item() <= 0.999


def test_derived_tables_match_definitions():
    s = Schedule.make("linear", 50)
    acp = 1.0
    for i in range(50):
        prev = acp
        acp *= 1 - s.betas[i].item()
        assert s.alphas_cumprod[i].item() == pytest.approx(acp, rel=1e-12)
        assert s.alphas_cumprod_prev[i].item() == pytest.approx(prev, rel=1e-12)
        beta_tilde = (1 - prev) / (1 - acp) * s.betas[i].item()
        assert s.posterior_variance[i].item() == pytest.approx(beta_tilde, rel=1e-12, abs=1e-300)
    assert s.posterior_variance[0].item() == 0.0
    clipped = s.posterior_log_variance_clipped
    assert clipped[0].item() == pytest.approx(math.log(s.posterior_variance[1].item()))
    assert torch.allclose(clipped[1:], s.posterior_variance[1:].log())


def test_extract_gathers_and_casts():
    table = torch.arange(10, dtype=torch.float64) * 0.5
    t = torch.tensor([0, 3, 9])
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float32)
    out = extract(table, t, x)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    assert out.flatten().tolist() == [0.0, 1.5, 4.5]
    out2 = extract(table, t, (3, 5))
    assert out2.shape == (3, 1)


def test_q_sample_moments_monte_carlo():
    s = Schedule.make("linear", 100)
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    for i in [0, 40, 99]:
        t = torch.full((n,), i, dtype=torch.long)
        noise = torch.randn(n, 1, generator=gen, dtype=torch.float64)
        xt = s.q_sample(x0, t, noise)
        acp = math.prod(1 - b for b in s.betas[: i + 1].tolist())
        se_mean = math.sqrt((1 - acp) / n)
        assert abs(xt.mean().item() - math.sqrt(acp) * 0.7) < 5 * se_mean
        assert xt.var().item() == pytest.approx(1 - acp, rel=0.02)


def test_q_sample_composes_single_steps():
    """x_t from eq. 17 has the same law as t applications of eq. 15 (checked by moments)."""
    s = Schedule.make("linear", 40)
    gen = torch.Generator().manual_seed(1)
    n = 200_000
    x = torch.full((n, 1), -1.2, dtype=torch.float64)
    for i in range(10):
        x = math.sqrt(1 - s.betas[i].item()) * x + math.sqrt(s.betas[i].item()) * torch.randn(
            n, 1, generator=gen, dtype=torch.float64
        )  # eq. 15
    mean, var, _ = s.q_mean_variance(torch.full((1, 1), -1.2, dtype=torch.float64), torch.tensor([9]))
    assert x.mean().item() == pytest.approx(mean.item(), abs=5 * math.sqrt(var.item() / n))
    assert x.var().item() == pytest.approx(var.item(), rel=0.02)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_posterior_matches_gaussian_conditioning(kind):
    """q(x_{t-1} | x_t, x_0) by conditioning the joint Gaussian of (x_{t-1}, x_t) given x_0 (eq. 20)."""
    s = Schedule.make(kind, 30)
    gen = torch.Generator().manual_seed(2)
    idx = torch.arange(30)
    x0 = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    xt = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    mean, var, logvar = s.q_posterior(x0, xt, idx)
    for i in range(30):
        betas = s.betas[: i + 1].tolist()
        acp_t = math.prod(1 - b for b in betas)
        acp_p = math.prod(1 - b for b in betas[:-1])
        var_p, var_t = 1 - acp_p, 1 - acp_t
        cov = math.sqrt(1 - betas[-1]) * var_p  # Cov(x_{t-1}, x_t | x_0)
        exp_mean = math.sqrt(acp_p) * x0[i] + cov / var_t * (xt[i] - math.sqrt(acp_t) * x0[i])
        exp_var = var_p - cov**2 / var_t
        assert torch.allclose(mean[i], exp_mean, atol=1e-10)
        assert var[i, 0].item() == pytest.approx(exp_var, rel=1e-9, abs=1e-14)
        if i > 0:
            assert logvar[i, 0].item() == pytest.approx(math.log(exp_var), rel=1e-9)


def test_respace_all_steps_is_identity():
    s = Schedule.make("cosine", 40)
    assert s.respace(40) is s
    assert s.respace(list(range(40))) is s
    # The respacing formula applied to every step reproduces the betas too.
    acp = s.alphas_cumprod
    betas = 1 - acp / torch.cat([acp.new_ones(1), acp[:-1]])
    assert torch.allclose(betas, s.betas, rtol=1e-12, atol=1e-15)


def test_respace_keeps_marginals_and_composes_timestep_map():
    s = Schedule.make("linear", 1000)
    r = s.respace(50)
    assert r.num_timesteps == 50
    kept = strided_timesteps(1000, 50)
    assert kept[0] == 0 and kept[-1] == 999 and len(kept) == 50
    assert torch.equal(r.timestep_map, torch.tensor(kept))
    assert torch.allclose(r.alphas_cumprod, s.alphas_cumprod[kept], rtol=1e-12)
    # Respacing twice composes the map with the parent's.
    rr = r.respace([0, 10, 49])
    assert rr.timestep_map.tolist() == [kept[0], kept[10], kept[49]]
    assert torch.allclose(rr.alphas_cumprod, s.alphas_cumprod[rr.timestep_map], rtol=1e-12)
    # The posterior of the respaced process is the exact q(x_{k_{i-1}} | x_{k_i}, x_0).
    i = 7
    a_t, a_p = s.alphas_cumprod[kept[i]].item(), s.alphas_cumprod[kept[i - 1]].item()
    beta_tilde = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    assert r.posterior_variance[i].item() == pytest.approx(beta_tilde, rel=1e-10)
    with pytest.raises(ValueError):
        s.respace([1000])


def test_linear_schedule_rejects_too_few_steps():
    with pytest.raises(ValueError):
        Schedule.make("linear", 20)  # β_T would be 1
    with pytest.raises(ValueError):
        Schedule.make("quadratic", 100)


def test_to_device_keeps_every_table_and_result():
    s = Schedule.make("cosine", 50).respace(10)
    moved = s.to("cpu")
    for f in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
              "posterior_mean_coef1", "posterior_mean_coef2", "timestep_map"):
        assert torch.equal(getattr(moved, f), getattr(s, f))
        assert getattr(moved, f).dtype == getattr(s, f).dtype
    x0, noise, t = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 3, 5, 9])
    assert torch.equal(moved.q_sample(x0, t, noise), s.q_sample(x0, t, noise))
