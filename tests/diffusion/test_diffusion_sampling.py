"""Samplers (Algorithm 2 / eq. 28, DDIM eq. 41-43, Langevin eq. 32) on cases with known answers."""

import math

import pytest
import torch

from pipeline.diffusion import (
    SAMPLERS,
    SamplerOptions,
    Schedule,
    ddim_step,
    dynamic_threshold,
    langevin_step,
    langevin_timesteps,
    run_sampler,
    sample_ancestral,
    sample_ddim,
    sample_langevin,
    sample_langevin_vp,
)

F64 = torch.float64
SD = 0.5  # data ~ N(0, SD²)


def gaussian_eps_model(s_orig: Schedule):
    """Exact E[ε | x_t] for N(0, SD²) data; called with ORIGINAL-schedule timesteps."""

    def model_fn(x, t):
        a = s_orig.alphas_cumprod[t].reshape(-1, *([1] * (x.ndim - 1)))
        return (1 - a).sqrt() * x / (a * SD**2 + 1 - a)

    return model_fn


def test_ddim_eta1_variance_and_mean_equal_ddpm_posterior():
    s = Schedule.make("linear", 100)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, generator=gen, dtype=F64)
    eps = torch.randn(6, 3, generator=gen, dtype=F64)
    t = torch.tensor([1, 2, 10, 50, 80, 99])
    xt = s.q_sample(x0, t, eps)
    z = torch.randn(6, 3, generator=gen, dtype=F64)
    mean = ddim_step(s, eps, xt, t, t - 1, eta=1.0, noise=torch.zeros_like(z))
    sample = ddim_step(s, eps, xt, t, t - 1, eta=1.0, noise=z)
    post_mean, post_var, _ = s.q_posterior(x0, xt, t)
    assert torch.allclose(mean, post_mean, atol=1e-10)
    assert torch.allclose((sample - mean) / z, post_var.sqrt(), atol=1e-10)  # σ_t² = β̃_t


def test_ddim_eta0_is_deterministic_and_consistent():
    """With the true ε, one DDIM step from q_sample(x0, t, ε) lands on q_sample(x0, t', ε)."""
    s = Schedule.make("cosine", 50)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 2, generator=gen, dtype=F64)
    eps = torch.randn(4, 2, generator=gen, dtype=F64)
    t = torch.tensor([40, 30, 20, 5])
    t_prev = torch.tensor([10, -1, 19, 0])
    x_prev = ddim_step(s, eps, s.q_sample(x0, t, eps), t, t_prev)
    expected = torch.where((t_prev >= 0)[:, None], s.q_sample(x0, t_prev.clamp(min=0), eps), x0)
    assert torch.allclose(x_prev, expected, atol=1e-10)


def test_samplers_call_model_with_original_timesteps():
    s = Schedule.make("linear", 1000)
    seen = []

    def model_fn(x, t):
        seen.append(t[0].item())
        return torch.zeros_like(x)

    r = s.respace(10)
    sample_ancestral(model_fn, r, (2, 2), generator=torch.Generator().manual_seed(0))
    assert seen == list(reversed(r.timestep_map.tolist())) and seen[0] == 999 and seen[-1] == 0
    seen.clear()
    sample_ddim(model_fn, s, (2, 2), 10, generator=torch.Generator().manual_seed(0))
    assert seen == list(reversed(r.timestep_map.tolist()))


def _reverse_std(r: Schedule, var_type: str) -> float:
    """Std of x_0 from ancestral sampling with the exact Gaussian denoiser, by a variance recursion.

    Each step is linear: x_{t-1} = (c1·g_t + c2)·x_t + σ_t z with g_t = √ᾱ SD²/(ᾱ SD² + 1 − ᾱ)
    (E[x0|x_t] = g_t x_t) and c1, c2 of eq. 22, all computed here from plain Python floats.
    """
    betas = r.betas.tolist()
    var, prod = 1.0, 1.0
    acps = []
    for b in betas:
        prod *= 1 - b
        acps.append(prod)
    for i in reversed(range(len(betas))):
        a, a_prev, b = acps[i], (acps[i - 1] if i > 0 else 1.0), betas[i]
        g = math.sqrt(a) * SD**2 / (a * SD**2 + 1 - a)
        c1 = math.sqrt(a_prev) * b / (1 - a)
        c2 = math.sqrt(1 - b) * (1 - a_prev) / (1 - a)
        if var_type == "beta":
            noise_var = b
        else:
            noise_var = (1 - a_prev) / (1 - a) * b
        var = (c1 * g + c2) ** 2 * var + (noise_var if i > 0 else 0.0)
    return math.sqrt(var)


@pytest.mark.parametrize("var_type", ["beta", "beta_tilde"])
def test_ancestral_with_exact_denoiser(var_type):
    """1000-step sampling recovers N(0, SD²); 50-step strided sampling matches the exact linear-Gaussian
    recursion of its own (coarser) reverse process, whose std brackets SD (β̃ below, β above)."""
    s = Schedule.make("linear", 1000)
    model = gaussian_eps_model(s)
    assert _reverse_std(s, var_type) == pytest.approx(SD, rel=0.01)
    x = sample_ancestral(model, s, (4000, 1), var_type=var_type, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert abs(x.mean().item()) < 0.03
    assert x.std().item() == pytest.approx(SD, rel=0.04)  # s.e. of the std is about 1.1 %
    r = s.respace(50)
    expected = _reverse_std(r, var_type)
    assert (expected > SD) if var_type == "beta" else (expected < 0.95 * SD)
    x = sample_ancestral(
        model, r, (40_000, 1), var_type=var_type, generator=torch.Generator().manual_seed(1), dtype=F64
    )
    assert x.std().item() == pytest.approx(expected, rel=0.015)  # s.e. about 0.35 %


def test_ddim_with_exact_denoiser_converges_to_gaussian():
    """For Gaussian data each DDIM (η=0) step is linear, so x_0 = gain·x_T; the gain tends to SD."""
    s = Schedule.make("linear", 1000)
    model = gaussian_eps_model(s)
    one = torch.ones(1, 1, dtype=F64)
    gains = [sample_ddim(model, s, one, n).item() for n in (10, 50, 200, 1000)]
    errors = [abs(g - SD) for g in gains]
    assert errors == sorted(errors, reverse=True)
    assert gains[-1] == pytest.approx(SD, rel=0.01)
    x, traj = sample_ddim(
        model,
        s,
        (20_000, 1),
        50,
        generator=torch.Generator().manual_seed(2),
        dtype=F64,
        return_trajectory=True,
    )
    assert traj.shape == (51, 20_000, 1) and torch.equal(traj[-1], x)
    assert torch.allclose(x, gains[1] * traj[0])  # deterministic given x_T
    assert x.std().item() == pytest.approx(SD, rel=0.1)


def test_ancestral_classifier_guidance_shifts_mean_by_scale_sigma_grad():
    s = Schedule.from_betas(torch.tensor([0.3], dtype=F64))  # one step, no noise added
    xT = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    grad = torch.tensor([[1.0, -2.0]], dtype=F64)

    def model_fn(x, t):
        return torch.zeros_like(x)

    base = sample_ancestral(model_fn, s, xT.clone())
    guided = sample_ancestral(model_fn, s, xT.clone(), cond_fn=lambda x, t: grad.expand_as(x), guidance_scale=2.5)
    assert torch.allclose(guided - base, 2.5 * 0.3 * grad.expand_as(xT))  # Algorithm 1: s·Σ·∇


def test_ddim_classifier_guidance_uses_eq38():
    s = Schedule.make("cosine", 10)
    xT = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    grad = torch.tensor([[0.5, 1.0]], dtype=F64)

    def model_fn(x, t):
        return 0.1 * x

    out = sample_ddim(model_fn, s, xT, [9], cond_fn=lambda x, t: grad.expand_as(x), guidance_scale=3.0)
    acp = s.alphas_cumprod[9].item()
    eps_hat = 0.1 * xT - math.sqrt(1 - acp) * 3.0 * grad  # eq. 38
    assert torch.allclose(out, (xT - math.sqrt(1 - acp) * eps_hat) / math.sqrt(acp))


def test_annealed_langevin_samples_a_gaussian():
    mu, tau = 1.5, 0.4
    sigmas = torch.logspace(0, -2, 10, dtype=F64)

    def score_fn(x, sigma):
        return -(x - mu) / (tau**2 + sigma[:, None] ** 2)  # score of N(mu, tau² + σ²)

    x = sample_langevin(score_fn, sigmas, (20_000, 1), 100, 2e-5, torch.Generator().manual_seed(0), dtype=F64)
    assert x.mean().item() == pytest.approx(mu, abs=0.02)
    assert x.std().item() == pytest.approx(tau, rel=0.05)


@pytest.mark.parametrize(("v", "var_type"), [(-1.0, "beta_tilde"), (1.0, "beta")])
def test_learned_sigma_endpoints_match_fixed_variances(v, var_type):
    """A learned-sigma output with v = -1 / +1 samples exactly like β̃ / β (eq. 35)."""
    s = Schedule.make("linear", 100).respace(20)
    model = gaussian_eps_model(Schedule.make("linear", 100))

    def learned(x, t):
        return torch.cat([model(x, t), torch.full_like(x, v)], dim=1)

    calls = []
    fixed = sample_ancestral(model, s, (50, 3), var_type=var_type, generator=torch.Generator().manual_seed(0))
    out = sample_ancestral(
        learned,
        s,
        (50, 3),
        learn_sigma=True,
        generator=torch.Generator().manual_seed(0),
        progress=lambda done, total: calls.append((done, total)),
    )
    assert torch.allclose(out, fixed, atol=1e-5)
    assert calls[-1] == (20, 20) and len(calls) == 20


def test_dynamic_threshold_leaves_in_range_samples_and_rescales_saturated_ones():
    inside = torch.tensor([[0.5, -0.9, 0.99, 0.0]])
    assert torch.equal(dynamic_threshold(inside, 0.9), inside)  # s = max(1, q) = 1: a plain clip that clips nothing
    big = torch.tensor([[4.0, -2.0, 1.0, 0.5, 3.0]], dtype=F64)
    s = torch.quantile(big.abs(), 0.75)  # |x| = 4, 2, 1, 0.5, 3 → 75th percentile 3
    assert float(s) == 3.0
    expect = torch.tensor([[3.0, -2.0, 1.0, 0.5, 3.0]], dtype=F64) / 3.0  # clip to ±3, then divide by 3
    assert torch.allclose(dynamic_threshold(big, 0.75), expect)
    both = dynamic_threshold(torch.cat([inside.double(), big[:, :4]]), 0.75)  # per sample, not per batch
    assert torch.equal(both[0], inside[0].double())


def test_ddim_with_dynamic_threshold_keeps_the_predicted_x0_in_range():
    """A model whose x̂₀ is far outside [-1, 1]: unthresholded DDIM lands there, thresholded DDIM in [-1, 1]."""
    s = Schedule.make("linear", 100)

    def x0_model(x, t):  # predicts x̂₀ = 5·sign pattern (x0 parameterisation)
        return 5.0 * torch.ones_like(x).cumsum(-1).remainder(2).mul(2).sub(1)

    xT = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    plain = sample_ddim(x0_model, s, xT, 10, parameterization="x0")
    thresh = sample_ddim(x0_model, s, xT, 10, parameterization="x0", threshold=0.995)
    assert plain.abs().max() > 4.9
    assert thresh.abs().max() <= 1.0 + 1e-9
    assert torch.allclose(thresh, plain / 5.0, atol=1e-9)  # the last step returns the rescaled x̂₀ exactly


# ----------------------------------------------------------------------------- Langevin with the diffusion score


def test_langevin_step_is_eq32():
    gen = torch.Generator().manual_seed(5)
    x, score, z = (torch.randn(4, 3, generator=gen, dtype=F64) for _ in range(3))
    delta = 0.037
    expected = x + delta / 2 * score + math.sqrt(delta) * z  # eq. 32, written out
    assert torch.allclose(langevin_step(x, score, delta, z), expected)


def test_langevin_vp_one_level_by_hand():
    """Two steps of eq. 32 at one level with the score of eq. 33 in the σ frame, then the x̂₀ of eq. 41."""
    s = Schedule.make("cosine", 10)
    xT = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(6))
    calls = []

    def model_fn(x, t):
        calls.append(t.tolist())
        return 0.3 * x + 0.01 * t[:, None].to(x)

    out = sample_langevin_vp(model_fn, s, xT, [6], langevin_steps=2, step_ratio=0.3,
                             generator=torch.Generator().manual_seed(7))
    a = float(s.alphas_cumprod[6])
    sigma = math.sqrt((1 - a) / a)
    delta = 0.3 * sigma**2
    g = torch.Generator().manual_seed(7)
    x = sigma * xT  # x_σ at the top level
    for _ in range(2):
        eps = 0.3 * math.sqrt(a) * x + 0.06
        score = -eps / math.sqrt(1 - a) * math.sqrt(a)  # eq. 33, carried to x_σ = x_t / √ᾱ
        x = x + delta / 2 * score + math.sqrt(delta) * torch.randn(x.shape, generator=g, dtype=F64)
    x0 = x - sigma * (0.3 * math.sqrt(a) * x + 0.06)  # x̂₀ from x_t = √ᾱ x_σ
    assert torch.allclose(out, x0)
    assert calls == [[6] * 5] * 3  # two Langevin steps and the final x̂₀, all at the original timestep 6


def test_langevin_with_the_exact_score_samples_the_data_gaussian():
    s = Schedule.make("linear", 1000)
    x = sample_langevin_vp(gaussian_eps_model(s), s, (10_000, 1), 20, langevin_steps=50,
                           generator=torch.Generator().manual_seed(8), dtype=F64)
    assert abs(x.mean().item()) < 0.03
    assert x.std().item() == pytest.approx(SD, rel=0.04)  # measured 0.511 (s.e. of the std ≈ 0.7 %)


def test_langevin_levels_are_geometric_in_sigma():
    s = Schedule.make("linear", 1000)
    levels = langevin_timesteps(s, 50)
    assert levels == sorted(set(levels)) and levels[0] == 0 and levels[-1] == 999 and len(levels) <= 50
    acp = s.alphas_cumprod[levels]
    gaps = torch.diff(0.5 * ((1 - acp) / acp).log())  # gaps in log σ
    assert gaps.min() > 0.5 * gaps.mean() and gaps.max() < 2 * gaps.mean()  # evenly strided t: ratio > 100


def test_sampler_registry_dispatches_to_the_samplers():
    s = Schedule.make("cosine", 20)
    model = gaussian_eps_model(s)
    xT = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(9))
    assert set(SAMPLERS) == {"ancestral", "ddim", "langevin"}
    o = SamplerOptions(eta=0.5, langevin_steps=2, langevin_step_ratio=0.2)
    for name, direct in [
        ("ddim", lambda g: sample_ddim(model, s, xT, 5, eta=0.5, generator=g)),
        ("ancestral", lambda g: sample_ancestral(model, s.respace(5), xT, generator=g)),
        ("langevin", lambda g: sample_langevin_vp(model, s, xT, 5, langevin_steps=2, step_ratio=0.2, generator=g)),
    ]:
        got = run_sampler(name, model, s, xT, 5, SamplerOptions(**{**o.__dict__,
                                                                   "generator": torch.Generator().manual_seed(1)}))
        assert torch.equal(got, direct(torch.Generator().manual_seed(1))), name
    with pytest.raises(ValueError, match="langevin"):
        run_sampler("euler", model, s, xT, 5)


def test_generate_samples_with_langevin_and_its_settings():
    from torch import nn

    from pipeline.eval import Generator, generate

    class Net(nn.Module):
        def forward(self, x, t, y=None):
            return 0.2 * x + 0.1 * y[:, None].to(x)

    gen = Generator(Net(), {"extra": {"diffusion": {"schedule": "cosine", "timesteps": 50}, "num_classes": 3,
                                      "sample_shape": [2]}})
    labels = torch.tensor([0, 1, 2, 1])
    got = generate(gen, labels, steps=6, sampler="langevin", seed=3, langevin_steps=2, langevin_step_ratio=0.2)
    g = torch.Generator().manual_seed(3)
    xT = torch.randn((4, 2), generator=g)
    want = sample_langevin_vp(lambda x, t: Net()(x, t, y=labels), gen.schedule, xT, 6, langevin_steps=2,
                              step_ratio=0.2, generator=g)
    assert torch.allclose(got, want)
    other = generate(gen, labels, steps=6, sampler="langevin", seed=3, langevin_steps=3, langevin_step_ratio=0.2)
    assert not torch.allclose(got, other)  # the settings reach the sampler
