"""ε / x₀ / v parameterisations (eq. 17, 27, 33): round trips and known cases in float64."""

import pytest
import torch

from pipeline.diffusion import (
    Schedule,
    model_eps_x0,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    score_from_eps,
    split_learned_sigma,
    training_target,
    v_target,
)


@pytest.fixture(scope="module")
def setup():
    s = Schedule.make("cosine", 100)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 3, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(16, 3, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 99, (16,), generator=gen)  # the last cosine step has ᾱ≈0; exclude it
    return s, x0, eps, t, s.q_sample(x0, t, eps)


def test_round_trips(setup):
    s, x0, eps, t, xt = setup
    assert torch.allclose(predict_x0_from_eps(s, xt, t, eps), x0, atol=1e-9)
    assert torch.allclose(predict_eps_from_x0(s, xt, t, x0), eps, atol=1e-9)
    v = v_target(s, x0, t, eps)
    assert torch.allclose(predict_x0_from_v(s, xt, t, v), x0, atol=1e-9)
    assert torch.allclose(predict_eps_from_v(s, xt, t, v), eps, atol=1e-9)


def test_v_definition(setup):
    s, x0, eps, t, _ = setup
    acp = s.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(v_target(s, x0, t, eps), acp.sqrt() * eps - (1 - acp).sqrt() * x0)


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_model_eps_x0_recovers_truth(setup, param):
    s, x0, eps, t, xt = setup
    out = training_target(s, x0, t, eps, param)
    e, x = model_eps_x0(s, out, xt, t, param)
    assert torch.allclose(e, eps, atol=1e-9) and torch.allclose(x, x0, atol=1e-9)
    # Learned sigma: twice the channels, only the first half is used.
    junk = torch.full_like(out, 123.0)
    e2, x2 = model_eps_x0(s, torch.cat([out, junk], dim=1), xt, t, param)
    assert torch.equal(e2, e) and torch.equal(x2, x)


def test_split_learned_sigma():
    out = torch.arange(2 * 6 * 2, dtype=torch.float64).reshape(2, 6, 2)
    mean, var = split_learned_sigma(out, 3)
    assert torch.equal(mean, out[:, :3]) and torch.equal(var, out[:, 3:])
    with pytest.raises(ValueError):
        split_learned_sigma(out, 2)
    with pytest.raises(ValueError):
        model_eps_x0(Schedule.make("linear", 30), out[:, :3], out[:, :3], torch.zeros(2, dtype=torch.long), "y")


def test_score_from_eps_gaussian_data():
    """For x0 ~ N(0, σ²), q(x_t) = N(0, ᾱσ² + 1 - ᾱ); the MMSE ε gives the exact score via eq. 33."""
    s = Schedule.make("linear", 1000)
    sd2 = 0.3**2
    t = torch.tensor([0, 10, 500, 999])
    xt = torch.linspace(-2, 2, 4, dtype=torch.float64).reshape(4, 1)
    acp = s.alphas_cumprod[t].reshape(4, 1)
    total_var = acp * sd2 + 1 - acp
    eps_opt = (1 - acp).sqrt() * xt / total_var  # E[ε | x_t]
    assert torch.allclose(score_from_eps(s, eps_opt, t), -xt / total_var, atol=1e-12)
