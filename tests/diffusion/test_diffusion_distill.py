"""Progressive distillation target and consistency-model helpers (eq. 43-44)."""

import pytest
import torch

from pipeline.diffusion import (
    Schedule,
    consistency_fn,
    consistency_skip_out,
    ddim_step,
    karras_sigmas,
    model_eps_x0,
    progressive_distillation_target,
)

F64 = torch.float64


def teacher(x, t):
    """Some nonlinear v-predicting teacher."""
    return torch.tanh(x) * (1 + t[:, None].to(x) / 100) - 0.3 * x


@pytest.mark.parametrize("param", ["v", "x0", "eps"])
def test_one_student_step_lands_on_two_teacher_steps(param):
    s = Schedule.make("cosine", 64)
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(6, 2, generator=gen, dtype=F64)
    t = torch.tensor([63, 40, 10, 5, 3, 2])
    t_mid = torch.tensor([55, 30, 8, 3, 1, 0])
    t_next = torch.tensor([47, 20, 6, 1, -1, -1])
    # The teacher's two steps, computed here with ddim_step directly.
    eps1, _ = model_eps_x0(s, teacher(x_t, t), x_t, t, "v")
    x_mid = ddim_step(s, eps1, x_t, t, t_mid)
    eps2, _ = model_eps_x0(s, teacher(x_mid, t_mid), x_mid, t_mid, "v")
    x_next = ddim_step(s, eps2, x_mid, t_mid, t_next)
    target = progressive_distillation_target(
        s, teacher, x_t, t, t_mid, t_next, parameterization=param, teacher_parameterization="v"
    )
    eps_student, x0_student = model_eps_x0(s, target, x_t, t, param)
    assert torch.allclose(ddim_step(s, eps_student, x_t, t, t_next), x_next, atol=1e-9)
    assert torch.allclose(x0_student[4:], x_next[4:], atol=1e-9)  # t_next = -1: the target is the end point


def test_consistency_skip_out_boundary_and_limits():
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=F64)
    c_skip, c_out = consistency_skip_out(sigma)
    assert c_skip[0].item() == pytest.approx(1.0) and c_out[0].item() == pytest.approx(0.0)
    assert c_skip[1].item() == pytest.approx(0.25 / (0.498**2 + 0.25))
    assert c_out[1].item() == pytest.approx(0.498 * 0.5 / (0.5 * 2**0.5))
    assert c_skip[2].item() < 1e-4 and c_out[2].item() == pytest.approx(0.5, rel=1e-3)
    x, F = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    f = consistency_fn(F, x, sigma)
    assert torch.allclose(f[0], x[0]) and torch.allclose(f, c_skip[:, None] * x + c_out[:, None] * F)


def test_karras_sigmas():
    sig = karras_sigmas(18)
    assert sig[0].item() == pytest.approx(80.0) and sig[-1].item() == pytest.approx(0.002)
    assert bool((sig.diff() < 0).all())
    rho = sig ** (1 / 7)
    assert torch.allclose(rho.diff(), rho.diff()[0].expand(17))  # evenly spaced in σ^{1/ρ}
