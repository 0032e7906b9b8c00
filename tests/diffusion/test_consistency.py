"""Consistency models on the VP schedule (eq. 44-46): hand computations of the mapping, targets and sampler."""

import math
import re

import pytest
import torch
from torch import nn

from pipeline.diffusion import Schedule, karras_sigmas, predict_x0_from_v
from pipeline.diffusion.consistency import (
    cd_teacher_step,
    consistency_levels,
    consistency_output,
    ct_num_levels,
    ct_pair,
    ct_target_ema,
    ema_update_,
    model_F,
    sample_consistency,
    sampling_timesteps,
    to_sigma_frame,
    vp_sigmas,
)

F64 = torch.float64
S = Schedule.make("cosine", 1000)


def test_sigma_frame_is_x0_plus_sigma_noise():
    gen = torch.Generator().manual_seed(0)
    x0, z = torch.randn(4, 3, generator=gen, dtype=F64), torch.randn(4, 3, generator=gen, dtype=F64)
    t = torch.tensor([0, 10, 500, 999])
    x_t = S.q_sample(x0, t, z)
    for i, ti in enumerate(t.tolist()):
        a = float(S.alphas_cumprod[ti])
        sigma = math.sqrt((1 - a) / a)
        assert float(vp_sigmas(S)[ti]) == pytest.approx(sigma)
        assert torch.allclose(to_sigma_frame(S, x_t, t)[i], x0[i] + sigma * z[i], rtol=1e-9, atol=1e-6)


def test_boundary_condition_and_coefficients():
    x_t = torch.randn(3, 2, 4, 4, dtype=F64)
    out = torch.randn(3, 2, 4, 4, dtype=F64)
    sig = vp_sigmas(S)
    sigma_min = float(sig[0])
    t0 = torch.zeros(3, dtype=torch.long)
    f = consistency_output(S, out, x_t, t0, "v", sigma_data=1.0, sigma_min=sigma_min)
    assert torch.allclose(f, x_t / math.sqrt(float(S.alphas_cumprod[0])))  # f(x, σ_min) = x (σ frame)
    # away from the boundary, by hand: c_skip = σd²/((σ−σmin)² + σd²), c_out = (σ−σmin)σd/√(σd² + σ²)
    t = torch.full((3,), 400)
    s, sd = float(sig[400]), 0.7
    c_skip = sd**2 / ((s - sigma_min) ** 2 + sd**2)
    c_out = (s - sigma_min) * sd / math.sqrt(sd**2 + s**2)
    x_sigma = x_t / math.sqrt(float(S.alphas_cumprod[400]))
    f = consistency_output(S, out, x_t, t, "v", sigma_data=sd, sigma_min=sigma_min)
    assert torch.allclose(f, c_skip * x_sigma - c_out * out)


def test_v_teacher_is_eq44_with_unit_sigma_data():
    """σ_data = 1, σ_min = 0: f is exactly the v-model's x̂₀ (so a CD student starts as the teacher)."""
    x_t, out = torch.randn(5, 3, dtype=F64), torch.randn(5, 3, dtype=F64)
    t = torch.tensor([1, 50, 300, 700, 990])
    f = consistency_output(S, out, x_t, t, "v", sigma_data=1.0, sigma_min=0.0)
    assert torch.allclose(f, predict_x0_from_v(S, x_t, t, out), atol=1e-8)


@pytest.mark.parametrize("param", ["eps", "x0"])
def test_F_is_minus_v_for_every_parameterization(param):
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 3, generator=gen, dtype=F64), torch.randn(4, 3, generator=gen, dtype=F64)
    t = torch.tensor([3, 100, 600, 900])
    x_t = S.q_sample(x0, t, eps)
    a = S.alphas_cumprod[t][:, None]
    v = a.sqrt() * eps - (1 - a).sqrt() * x0  # by hand
    out = eps if param == "eps" else x0
    assert torch.allclose(model_F(S, out, x_t, t, param), -v, atol=1e-8)


def test_cd_target_is_a_manual_ddim_step():
    def teacher(x, t):  # some v-predicting network
        return torch.sin(x) * (1 + t[:, None].to(x) / 1000)

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, generator=gen, dtype=F64)
    t_next, t_cur = torch.tensor([900, 400, 17]), torch.tensor([850, 200, 0])
    got = cd_teacher_step(S, teacher, x, t_next, t_cur, "v")
    for i in range(3):
        a_n, a_c = float(S.alphas_cumprod[t_next[i]]), float(S.alphas_cumprod[t_cur[i]])
        v = teacher(x[i:i + 1], t_next[i:i + 1])[0]
        eps = math.sqrt(1 - a_n) * x[i] + math.sqrt(a_n) * v
        x0 = (x[i] - math.sqrt(1 - a_n) * eps) / math.sqrt(a_n)  # eq. 41
        manual = math.sqrt(a_c) * x0 + math.sqrt(1 - a_c) * eps  # eq. 43, σ = 0
        assert torch.allclose(got[i], manual, atol=1e-10)


def test_ct_pair_uses_the_same_noise_for_both_levels():
    gen = torch.Generator().manual_seed(3)
    x0, z = torch.randn(3, 2, generator=gen, dtype=F64), torch.randn(3, 2, generator=gen, dtype=F64)
    t_next, t_cur = torch.tensor([999, 300, 5]), torch.tensor([900, 120, 0])
    x_next, x_cur = ct_pair(S, x0, t_next, t_cur, z)
    sig = vp_sigmas(S)
    # eq. 46 in the σ frame: x + σ_{n+1} z and x + σ_n z
    assert torch.allclose(to_sigma_frame(S, x_next, t_next), x0 + sig[t_next][:, None] * z, atol=1e-6)
    assert torch.allclose(to_sigma_frame(S, x_cur, t_cur), x0 + sig[t_cur][:, None] * z, atol=1e-9)


def test_levels_are_snapped_karras_sigmas():
    levels = consistency_levels(S, 18, sigma_max=80.0)
    assert levels == sorted(set(levels)) and levels[0] == 0 and len(levels) <= 18
    sig = vp_sigmas(S)
    wanted = karras_sigmas(18, float(sig[0]), 80.0)
    for w in wanted.tolist():  # each Karras level lands on the timestep with the nearest log σ (brute force)
        best = min(range(1000), key=lambda i: abs(math.log(float(sig[i])) - math.log(w)))
        assert best in levels
    assert float(sig[levels[-1]]) == pytest.approx(80.0, rel=0.05)
    with pytest.raises(ValueError):
        consistency_levels(S, 1)


def test_multistep_levels():
    levels = [0, 5, 20, 60, 150, 400, 800]
    assert sampling_timesteps(levels, 1) == [800]
    assert sampling_timesteps(levels, 2) == [800, 60]  # positions 6, 3
    assert sampling_timesteps(levels, 3) == [800, 150, 20]  # positions 6, 4, 2
    with pytest.raises(ValueError):
        sampling_timesteps(levels, 7)


def test_sampler_noise_levels_and_point_mass():
    """A consistency model of data concentrated at c sends any noise to c; re-noising uses √(σ_τ² − σ_min²)."""
    c = torch.tensor([0.5, -1.0], dtype=F64)

    def exact_v(x_t, t):  # the v of the point mass: ε = (x_t − √ᾱ c)/√(1−ᾱ), v = √ᾱ ε − √(1−ᾱ) c
        a = S.alphas_cumprod[t][:, None]
        eps = (x_t - a.sqrt() * c) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * c

    seen: list[tuple[int, float]] = []
    xT = torch.randn(6, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    levels = consistency_levels(S, 18)
    steps = sampling_timesteps(levels, 2)
    x = sample_consistency(exact_v, S, xT, steps, parameterization="v", sigma_data=1.0,
                           generator=torch.Generator().manual_seed(5), on_step=lambda t, s: seen.append((t, s)))
    sig = vp_sigmas(S)
    assert [t for t, _ in seen] == steps
    assert seen[0][1] == pytest.approx(float(sig[steps[0]]))
    assert seen[1][1] == pytest.approx(math.sqrt(float(sig[steps[1]]) ** 2 - float(sig[0]) ** 2))
    assert torch.allclose(x, c.expand_as(x), atol=0.02)  # σ_min shifts f by O(σ_min) from the exact x̂₀


def test_target_ema_update():
    target, online = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    ema_update_(target, online, 0.9)
    for k, v in target.state_dict().items():
        assert torch.allclose(v, 0.9 * before[k] + 0.1 * online.state_dict()[k])


def _tiny_dit():
    from pipeline.models import build_model

    return build_model("dit", input_size=4, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2,
                       num_classes=3, learn_sigma=False)


@pytest.mark.parametrize("mode", ["distill", "train"])
def test_task_student_target_and_loss(mode):
    from pipeline.train.consistency_task import ConsistencyTask

    torch.manual_seed(0)
    teacher = _tiny_dit()
    for p in teacher.parameters():  # a teacher that is not the identity-at-init DiT
        p.data.add_(0.05 * torch.randn_like(p))
    stage = {"mode": mode, "levels": 8, "target_ema": 0.5, "diffusion": {"schedule": "cosine", "timesteps": 100},
             "train": {"steps": 10}, "curriculum": {"s0": 2, "s1": 7, "mu0": 0.5},  # CT: μ(0) = μ0 = 0.5
             "model": {"name": "dit", "args": {"input_size": 4, "patch_size": 2, "in_channels": 2, "hidden_size": 32,
                                               "depth": 1, "num_heads": 2, "num_classes": 3, "learn_sigma": False}}}
    meta = {"name": "dit", "args": stage["model"]["args"],
            "extra": {"diffusion": {"schedule": "cosine", "timesteps": 100, "parameterization": "v"},
                      "num_classes": 3, "sample_shape": [2, 4, 4], "latent_scale": 1.0}}
    if mode == "distill":
        task = ConsistencyTask({**stage, "model": None}, teacher=teacher, teacher_meta=meta)
    else:
        task = ConsistencyTask(stage, num_classes=3, data={"sample_shape": [2, 4, 4]})
    model = task.build_model()
    if mode == "distill":  # CD: the student starts as the teacher
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), teacher.state_dict().values(),
                                                     strict=True))
    batch = {"image": torch.randn(6, 2, 4, 4), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    loss, _ = task.loss(model, batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and task.target is not None
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    before = {k: v.clone() for k, v in task.target.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    task.loss(model, batch, torch.Generator().manual_seed(1))  # θ⁻ ← ½θ⁻ + ½θ before the next loss
    for k, v in task.target.state_dict().items():
        if v.dtype.is_floating_point and k in dict(model.named_parameters()):
            assert torch.allclose(v, 0.5 * before[k] + 0.5 * model.state_dict()[k])
    extra = task.export_extra()
    assert extra["consistency"]["timesteps"] == task.levels and extra["diffusion"]["parameterization"] == "v"



def _paper_N(k: int, K: int, s0: int, s1: int) -> int:
    """N(k) = ⌈√(k/K·((s1+1)² − s0²) + s0²) − 1⌉ + 1, in floats (Song et al. 2023, CT schedule)."""
    return math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def test_ct_curriculum_matches_the_paper_formulas():
    K = 1000
    by_hand = {0: 2, 1: 6, 10: 16, 100: 48, 500: 107, 999: 151, 1000: 151}  # √26.797 = 5.18 → 6, …
    assert {k: ct_num_levels(k, K) for k in by_hand} == by_hand  # defaults s0 = 2, s1 = 150
    ns = [ct_num_levels(k, K, 2, 150) for k in range(K + 1)]
    assert ns == [_paper_N(k, K, 2, 150) for k in range(K + 1)]
    assert ns == sorted(ns) and ns[0] == 2 and ns[-1] == 151  # N(0) = s0, N(K) = s1 + 1, never decreasing
    assert ct_num_levels(3, 10, 2, 17) == 10  # √(0.3·320 + 4) = 10 exactly: ⌈10 − 1⌉ + 1, not 11
    mus = [ct_target_ema(n, 2, 0.9) for n in ns]
    assert mus[0] == pytest.approx(0.9)  # μ(0) = μ0
    assert mus[-1] == pytest.approx(math.exp(2 * math.log(0.9) / 151))
    assert ct_target_ema(48, 2, 0.95) == pytest.approx(0.95 ** (2 / 48))
    assert mus == sorted(mus) and all(0 < m < 1 for m in mus)
    with pytest.raises(ValueError):
        ct_num_levels(11, 10)


class _FakeEngine(nn.Module):
    """A DeepSpeed-like wrapper: ``module`` and an LR scheduler whose count is the optimiser step."""

    def __init__(self, module, step):
        super().__init__()
        self.module = module
        self.lr_scheduler = type("Sched", (), {"last_epoch": step})()

    def forward(self, *a, **kw):
        return self.module(*a, **kw)


def test_ct_task_draws_from_N_k_levels_and_applies_mu_k(monkeypatch):
    import pipeline.train.consistency_task as ct

    torch.manual_seed(0)
    K, s0, s1, mu0 = 12, 2, 9, 0.6
    stage = {"mode": "train", "diffusion": {"schedule": "cosine", "timesteps": 100}, "train": {"steps": K},
             "curriculum": {"s0": s0, "s1": s1, "mu0": mu0},
             "model": {"name": "dit", "args": {"input_size": 4, "patch_size": 2, "in_channels": 2, "hidden_size": 32,
                                               "depth": 1, "num_heads": 2, "num_classes": 3, "learn_sigma": False}}}
    task = ct.ConsistencyTask(stage, num_classes=3, data={"sample_shape": [2, 4, 4]})
    sched = task.schedule
    assert task.levels == consistency_levels(sched, s1 + 1)  # exported: the final discretisation N(K)
    drawn = []
    real_adjacent = ct.adjacent_levels
    monkeypatch.setattr(ct, "adjacent_levels", lambda lv, b, g: (drawn.append(lv.tolist()), real_adjacent(lv, b, g))[1])
    model = task.build_model()
    batch = {"image": torch.randn(4, 2, 4, 4), "label": torch.tensor([0, 1, 2, 0])}
    for k in range(K):
        before = {n: v.clone() for n, v in task.target.state_dict().items()} if task.target is not None else None
        task.loss(model, batch, torch.Generator().manual_seed(k))
        n_k = _paper_N(k, K, s0, s1)
        assert drawn[-1] == consistency_levels(sched, n_k), k  # pairs from the N(k) levels
        if before is not None:  # the update after step k−1 used μ(k−1) = exp(s0 log μ0 / N(k−1))
            mu = math.exp(s0 * math.log(mu0) / _paper_N(k - 1, K, s0, s1))
            for n, p in model.named_parameters():
                assert torch.allclose(task.target.state_dict()[n], mu * before[n] + (1 - mu) * p.detach()), (k, n)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
    assert len({len(d) for d in drawn}) > 3  # the number of levels grew during training
    # a DeepSpeed engine's step (restored on resume) decides k, not the number of calls
    task.loss(_FakeEngine(model, 11), batch, torch.Generator().manual_seed(0))
    assert drawn[-1] == consistency_levels(sched, _paper_N(11, K, s0, s1)) != consistency_levels(sched, 2)


def test_cd_task_keeps_fixed_levels_and_target_ema():
    import pipeline.train.consistency_task as ct

    teacher = _tiny_dit()
    meta = {"name": "dit", "args": {}, "extra": {"diffusion": {"schedule": "cosine", "timesteps": 100,
                                                              "parameterization": "v"}, "num_classes": 3}}
    task = ct.ConsistencyTask({"mode": "distill", "levels": 8, "target_ema": 0.7}, teacher=teacher, teacher_meta=meta)
    assert all(task.levels_at(k) == consistency_levels(task.schedule, 8) for k in (0, 5, 10_000))
    assert all(task.mu_at(k) == 0.7 for k in (0, 5, 10_000))


def _distill_job(*overrides: str):
    from pathlib import Path

    from pipeline.config import apply_overrides, parse_spec, read_yaml

    path = Path(__file__).resolve().parents[2] / "jobs" / "distill.yaml"
    return parse_spec(apply_overrides(read_yaml(path), list(overrides), str(path)), str(path))


def test_job_spec_checks_consistency_and_classifier_guidance_fields():
    from pipeline.config import SpecError

    spec = _distill_job()
    assert spec.stages["consistency_distill"].mode == "distill" and spec.stages["diffusion"].sampling.classifier
    bad = {
        "stages.consistency_distill.needs=[encode]": "needs a diffusion stage as its teacher",
        "stages.consistency_train.model=null": "mode: train needs `model`",
        "stages.consistency_distill.eval_steps=[18]": "eval_steps must lie in [1, levels-1 = 17]",
        "stages.diffusion.sampling.classifier=classifier": "must be an earlier `classifier` stage with `noisy: true`",
        "stages.distill.sampling.classifier_scale=2": "classifier_scale needs `classifier`",
        "stages.consistency_distill.mode=teach": "stages.consistency_distill.mode",
    }
    for override, message in bad.items():
        with pytest.raises(SpecError, match=re.escape(message)):
            _distill_job(override)
    assert _distill_job("stages.diffusion.sampling.classifier=models:/x@champion")


def test_dit_fits_the_diffusion_task_and_samplers():
    """jobs/dit.yaml's DiT is called as model(x, t, y=y) by the diffusion task, DDIM/ancestral and CFG."""
    from pathlib import Path

    import yaml

    from pipeline.eval import Generator, generate
    from pipeline.train.tasks import DiffusionTask

    stage = yaml.safe_load((Path(__file__).resolve().parents[2] / "jobs" / "dit.yaml").read_text())["stages"][
        "diffusion"]
    stage["model"]["args"].update(hidden_size=32, depth=1, num_heads=2)  # same layout, smaller
    task = DiffusionTask(stage, num_classes=10, data={"sample_shape": [2, 8, 8], "latent_scale": 1.0})
    model = task.build_model()
    batch = {"image": torch.randn(4, 2, 8, 8), "label": torch.tensor([0, 3, 9, 5])}
    loss, _ = task.loss(model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and model.y_embedder.weight.grad is not None
    gen = Generator(model.eval(), {"name": "dit", "args": stage["model"]["args"], "extra": task.export_extra()})
    labels = torch.tensor([1, 2, 3])
    for sampler in ("ddim", "ancestral"):
        x = generate(gen, labels, steps=3, guidance=2.0, sampler=sampler)
        assert x.shape == (3, 2, 8, 8) and torch.isfinite(x).all()


def test_ct_step_follows_the_optimiser_through_the_loop_and_a_resume(tmp_path):
    """Under the real loop (DeepSpeed, ZeRO-1) the CT task's k is the optimiser step, also after a resume."""
    import pipeline.train.consistency_task as ct
    from pipeline.train.loop import run_plain, tensor_stream

    seen: list[int] = []

    class Recording(ct.ConsistencyTask):
        def levels_at(self, k):
            seen.append(k)
            return super().levels_at(k)

    args = {"in_channels": 2, "model_channels": 8, "channel_mult": [1], "num_res_blocks": 1,
            "attention_resolutions": [], "num_classes": 3}
    train = {"steps": 4, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 2, "log_every": 1}
    stage = {"mode": "train", "diffusion": {"schedule": "cosine", "timesteps": 100}, "train": train,
             "curriculum": {"s0": 2, "s1": 9, "mu0": 0.9}, "model": {"name": "unet", "args": args}}
    scale = {"workers": 1, "gpus_per_worker": 0, "zero_stage": 1, "precision": "fp32"}
    g = torch.Generator().manual_seed(0)
    data = {"image": torch.randn(32, 2, 4, 4, generator=g), "label": torch.arange(32) % 3}

    stream = tensor_stream(data, rank=0, world=1, micro=8, seed=0)

    def task():
        t = Recording(stage, num_classes=3, data={"sample_shape": [2, 4, 4]})
        seen.clear()  # the constructor asks for the final levels, N(K)
        return t

    _, _, saved = run_plain(task(), train, scale, stream, checkpoint_root=str(tmp_path))
    assert seen == [0, 1, 2, 3]
    run_plain(task(), train, scale, stream, resume_dir=saved[0])  # resumed at step 2
    assert seen == [2, 3]
