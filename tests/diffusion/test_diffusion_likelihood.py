"""nll_bits_per_dim (eq. 25-26) against analytic values for known Gaussian cases, computed in float64."""

import math

import pytest
import torch
from scipy.stats import norm

from pipeline.diffusion import Schedule, nll_bits_per_dim

F64 = torch.float64
LN2 = math.log(2.0)


def _tables(betas):
    """ᾱ_t and ᾱ_{t-1} by plain Python products, independent of Schedule's derived tables."""
    acp, prev, a = [], [], 1.0
    for b in betas:
        prev.append(a)
        a *= 1 - b
        acp.append(a)
    return acp, prev


def _prior_kl(acp_T, m2):
    """KL(N(√ᾱ_T x, 1-ᾱ_T) || N(0, 1)) with E[x²] = m2, in nats."""
    return 0.5 * (-1 - math.log(1 - acp_T) + (1 - acp_T) + acp_T * m2)


@pytest.mark.parametrize("decoder", ["gaussian", "discretized"])
def test_point_mass_data_is_exact(decoder):
    """Data = a single point x*, model predicts x₀ = x*: every t>0 KL is 0 (β̃ variances), L_0 and
    L_T are closed forms, so bits/dim is deterministic whatever the noise."""
    betas = torch.linspace(0.01, 0.2, 12, dtype=F64)
    s = Schedule.from_betas(betas)
    x_star = torch.tensor([[-1.0, 64 / 127.5 - 1, 1.0]], dtype=F64).repeat(4, 1)  # on the 8-bit grid

    def model_fn(x, t):
        return x_star[: x.shape[0]]

    bpd = nll_bits_per_dim(
        model_fn,
        s,
        x_star,
        parameterization="x0",
        var_type="beta_tilde",
        decoder=decoder,
        noise_generator=torch.Generator().manual_seed(0),
    )
    acp, prev = _tables(betas.tolist())
    sigma0_sq = (1 - prev[1]) / (1 - acp[1]) * betas[1].item()  # clipped: index 0 uses index 1's β̃
    sd = math.sqrt(sigma0_sq)
    if decoder == "gaussian":
        l0 = [0.5 * math.log(2 * math.pi * sigma0_sq)] * 3
    else:
        l0 = [
            -norm.logcdf(1 / 255 / sd),
            -math.log(norm.cdf(1 / 255 / sd) - norm.cdf(-1 / 255 / sd)),
            -norm.logcdf(1 / 255 / sd),
        ]
    prior = [_prior_kl(acp[-1], v**2) for v in x_star[0].tolist()]
    expected = (sum(l0) + sum(prior)) / 3 / LN2
    assert torch.allclose(bpd, torch.full((4,), expected, dtype=F64), rtol=1e-10)


@pytest.mark.parametrize("var_type", ["beta_tilde", "beta"])
def test_gaussian_data_matches_analytic_expected_vlb(var_type):
    """x₀ ~ N(0, σ_d²) with the posterior-optimal denoiser x̂₀ = E[x₀ | x_t]: E[L_VLB] has a closed form.

    Each KL term is 0.5(-1 + log σ_p² − log β̃ + β̃/σ_p² + c₁² Var[x₀|x_t]/σ_p²) and the Gaussian
    decoder term is 0.5 log(2πσ₀²) + Var[x₀|x₁]/(2σ₀²). The Monte Carlo mean must agree within 5 s.e.
    """
    sd2 = 0.5**2
    betas = torch.linspace(0.02, 0.4, 10, dtype=F64)
    s = Schedule.from_betas(betas)
    acp, prev = _tables(betas.tolist())
    T = len(acp)

    def model_fn(x, t):
        a = s.alphas_cumprod[t].reshape(-1, 1)
        return a.sqrt() * sd2 / (a * sd2 + 1 - a) * x  # E[x0 | x_t]

    n = 20_000
    gen = torch.Generator().manual_seed(0)
    x0 = math.sqrt(sd2) * torch.randn(n, 1, generator=gen, dtype=F64)
    bpd = nll_bits_per_dim(
        model_fn,
        s,
        x0,
        parameterization="x0",
        var_type=var_type,
        decoder="gaussian",
        noise_generator=torch.Generator().manual_seed(1),
    )

    def post_var_x0(i):
        return sd2 * (1 - acp[i]) / (acp[i] * sd2 + 1 - acp[i])

    def beta_tilde(i):
        return (1 - prev[i]) / (1 - acp[i]) * betas[i].item()

    total = _prior_kl(acp[-1], sd2)
    for i in range(T):
        if var_type == "beta_tilde":
            var_p = beta_tilde(i) if i > 0 else beta_tilde(1)
        else:
            var_p = betas[i].item()
        c1 = math.sqrt(prev[i]) * betas[i].item() / (1 - acp[i])
        if i == 0:  # c1 = 1 here: the decoder mean is x̂₀(x₁)
            total += 0.5 * math.log(2 * math.pi * var_p) + c1**2 * post_var_x0(0) / (2 * var_p)
        else:
            bt = beta_tilde(i)
            total += 0.5 * (-1 + math.log(var_p) - math.log(bt) + bt / var_p + c1**2 * post_var_x0(i) / var_p)
    expected = total / LN2
    se = bpd.std().item() / math.sqrt(n)
    assert abs(bpd.mean().item() - expected) < 5 * se, (bpd.mean().item(), expected, se)
    # The bound is above the true NLL of N(0, σ_d²) (its differential entropy in bits).
    assert expected > 0.5 * math.log2(2 * math.pi * math.e * sd2)
