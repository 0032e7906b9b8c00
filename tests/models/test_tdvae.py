"""TD-VAE: eq. 14's terms against torch.distributions, shapes, jump sampling, jumpy rollouts, learning."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from pipeline.models import build_model
from pipeline.models.tdvae import TDVAE, filmstrip_frames, jumps_needed
from pipeline.objectives import get_objective
from pipeline.objectives.tdvae import evaluate_sequences, gaussian_kl, gaussian_log_prob, jump_loss, sample_jumps

ARGS = {"frames": 6, "frame_size": 8, "z_dim": 4, "belief_dim": 16, "hidden": 32, "max_jump": 3}


def _normal(mean: torch.Tensor, logvar: torch.Tensor) -> Normal:
    return Normal(mean, (0.5 * logvar).exp())


def test_gaussian_terms_match_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    mq, lq, mp, lp, z = (torch.randn(5, 7, generator=g) for _ in range(5))
    ref_kl = kl_divergence(_normal(mq, lq), _normal(mp, lp)).sum(-1)
    torch.testing.assert_close(gaussian_kl(mq, lq, mp, lp), ref_kl)
    torch.testing.assert_close(gaussian_log_prob(z, mp, lp), _normal(mp, lp).log_prob(z).sum(-1))
    assert gaussian_kl(mq, lq, mq, lq).abs().max() < 1e-6


def test_jump_loss_is_minus_eq14_computed_with_torch_distributions() -> None:
    torch.manual_seed(0)
    model = build_model("td_vae", **ARGS)
    x = (torch.rand(3, 1, 8, 8 * 6) < 0.3).float() * 2 - 1  # binary pixels: p_D is an exact Bernoulli
    t1, t2 = torch.tensor([0, 2, 1]), torch.tensor([1, 5, 3])
    eps2, eps1 = torch.randn(3, 4), torch.randn(3, 4)
    out = model(x, t1, t2, eps2, eps1)
    parts = jump_loss(out)
    # independent evaluation of eq. 14 from the four distributions, rebuilt from the model's own modules
    frames = filmstrip_frames(x, 6)
    b = model.beliefs(frames)
    rows = torch.arange(3)
    b1, b2 = b[rows, t1], b[rows, t2]
    p_b2 = _normal(*model.belief(b2))
    z2 = p_b2.loc + p_b2.scale * eps2
    q_s = _normal(*model.smoothing(z2, b1, b2))
    z1 = q_s.loc + q_s.scale * eps1
    p_b1 = _normal(*model.belief(b1))
    p_t = _normal(*model.transition(z1, t2 - t1))
    p_d = Bernoulli(logits=model.decode(z2))
    x2 = (frames[rows, t2] + 1) / 2
    log_pd = p_d.log_prob(x2).flatten(1).sum(1)
    # eq. 14 with the smoothing term in expectation over z1 (closed form), the rest at the samples
    j = (log_pd - kl_divergence(q_s, p_b1).sum(-1) + p_t.log_prob(z2).sum(-1) - p_b2.log_prob(z2).sum(-1))
    torch.testing.assert_close(parts["loss"], -j)
    torch.testing.assert_close(parts["recon"], -log_pd)
    # the closed-form smoothing KL is the mean over z1 ~ q_S of log q_S(z1) − log p_B(z1|b1)
    zs = q_s.rsample((20000,))
    mc = (q_s.log_prob(zs) - p_b1.log_prob(zs)).sum(-1).mean(0).detach()
    torch.testing.assert_close(parts["kl_smooth"], mc, atol=0.05 + 0.05 * float(mc.abs().max()), rtol=0)


def test_shapes_and_filmstrip_split() -> None:
    model = build_model("td_vae", **ARGS)
    frames = torch.randn(2, 6, 1, 8, 8)
    strip = frames.permute(0, 2, 3, 1, 4).reshape(2, 1, 8, 48)  # frame t in columns [8t, 8t + 8)
    torch.testing.assert_close(model.split(strip), frames)
    torch.testing.assert_close(strip[:, :, :, 16:24], frames[:, 2])
    out = model(strip, torch.tensor([0, 3]), torch.tensor([2, 4]), torch.zeros(2, 4), torch.zeros(2, 4))
    assert out["x2_logits"].shape == (2, 1, 8, 8) and out["z1"].shape == (2, 4)
    torch.testing.assert_close(out["x2"], frames[[0, 1], [2, 4]])
    assert model.beliefs(frames).shape == (2, 6, 16 + 32)  # [LSTM state, features of the newest frame]
    pred = model.predict(frames[:, :3], [1, 3], torch.Generator().manual_seed(0), samples=5)
    assert set(pred) == {1, 3} and pred[1].shape == (5, 2, 1, 8, 8)
    # the first draw by hand: z ~ p_B(· | b) at the LAST context frame, then one δ = k jump from that same z
    # for each horizon, decoded as Bernoulli means mapped to [-1, 1]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        mean, logvar = model.belief(model.beliefs(frames[:, :3])[:, 2])
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g)
        for k in (1, 3):
            m, lv = model.transition(z, torch.full((2,), k))
            logits = model.decode(m + (0.5 * lv).exp() * torch.randn(m.shape, generator=g))
            torch.testing.assert_close(pred[k][0], 2 * torch.sigmoid(logits) - 1)
    assert not torch.allclose(pred[1][0], pred[1][1])  # each of the 5 draws is its own sample
    assert model.filter_reconstruct(frames).shape == frames.shape
    with pytest.raises(ValueError, match="jump lengths"):
        model.transition(torch.zeros(1, 4), torch.tensor([4]))
    with pytest.raises(ValueError, match="max_jump"):
        TDVAE(frames=4, max_jump=4)


def test_sample_jumps_stay_in_range_and_cover_every_pair() -> None:
    g = torch.Generator().manual_seed(0)
    t1, t2 = sample_jumps(20000, 6, 3, g)
    assert (t1 >= 0).all() and (t1 < t2).all() and (t2 <= 5).all() and ((t2 - t1) <= 3).all()
    allowed = {(a, b) for a in range(6) for b in range(a + 1, min(a + 3, 5) + 1)}
    assert set(zip(t1.tolist(), t2.tolist(), strict=True)) == allowed
    for d in (1, 2, 3):  # the jump length is uniform in 1..max_jump
        assert abs(float(((t2 - t1) == d).float().mean()) - 1 / 3) < 0.02
    t1, t2 = sample_jumps(100, 3, 5, g)  # max_jump larger than the sequence allows
    assert ((t2 - t1) <= 2).all() and (t2 <= 2).all()


class _CountingTransition:
    """Wraps a model's transition and records the jump lengths it is called with."""

    def __init__(self, model: TDVAE) -> None:
        self.inner, self.calls = model.transition, []
        model.transition = self

    def __call__(self, z, jump):
        self.calls.append(sorted(set(jump.tolist())))
        return self.inner(z, jump)


def test_rollout_jumps_over_intermediate_steps() -> None:
    model = build_model("td_vae", **ARGS)  # max_jump = 3
    counter = _CountingTransition(model)
    model.predict(torch.randn(2, 2, 1, 8, 8), [3], samples=1)
    assert counter.calls == [[3]]  # one δ=3 jump, never the per-step transition for t+1, t+2
    counter.calls.clear()
    model.predict(torch.randn(2, 2, 1, 8, 8), [1, 2, 3, 7], samples=2)
    # horizons 1..3: one jump each; 7 > max_jump: ceil(7/3) = 3 jumps of 3, 3, 1 — per sample
    assert counter.calls == [[1], [2], [3], [3], [3], [1]] * 2
    assert sum(jumps_needed(k, 3) for k in (1, 2, 3, 7)) == 6


def test_learns_a_tiny_batch_and_evaluates() -> None:
    torch.manual_seed(0)
    # four sequences of a bright 2x2 square moving right one pixel per frame, from different rows
    frames = -torch.ones(4, 6, 1, 8, 8)
    for i in range(4):
        for t in range(6):
            frames[i, t, 0, 2 * i:2 * i + 2, t:t + 2] = 1.0
    strip = frames.permute(0, 2, 3, 1, 4).reshape(4, 1, 8, 48)
    model = build_model("td_vae", **ARGS)
    objective = get_objective("td_vae")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def mean_loss(n: int = 16) -> float:
        with torch.no_grad():
            return sum(float(objective.loss(model, {"image": strip}, g, {})[0]) for _ in range(n)) / n

    before = mean_loss()
    for _ in range(250):
        loss, parts = objective.loss(model, {"image": strip}, g, {})
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mean_loss()
    assert set(parts) == {"recon", "kl_smooth", "kl_jump", "kl_weight"}
    assert after < 0.4 * before, (before, after)
    model.eval()
    metrics, images = evaluate_sequences(model, frames, {"horizons": [1, 2], "eval_samples": 4}, seed=0)
    # a 2x2 square moving one pixel: the repeated last frame is wrong on 4 of 64 pixels (error 2² each)
    assert metrics["eval/repeat_last_mse_k1"] == pytest.approx(4 * 4 / 64)
    assert metrics["eval/pred_mse_k1"] < metrics["eval/repeat_last_mse_k1"]
    assert metrics["eval/context_frames"] == 4 and math.isfinite(metrics["eval/recon_mse"])
    assert set(images) == {"samples/rollouts.png", "samples/filter_reconstructions.png"}
    assert all(png.startswith(b"\x89PNG") for png in images.values())
    with pytest.raises(ValueError, match="context"):
        evaluate_sequences(model, frames, {"horizons": [1], "context": 6}, seed=0)


def test_kl_warmup_weights_and_cfg_checks() -> None:
    model = build_model("td_vae", **ARGS)
    objective = get_objective("td_vae")
    strip = torch.zeros(2, 1, 8, 48)
    g = torch.Generator().manual_seed(0)
    weights = [float(objective.loss(model, {"image": strip}, g, {"kl_warmup": 4})[1]["kl_weight"]) for _ in range(6)]
    assert weights == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0] and int(model.num_updates) == 6
    model.eval()  # evaluation passes do not advance the warm-up
    objective.loss(model, {"image": strip}, g, {"kl_warmup": 4})
    assert int(model.num_updates) == 6
    objective.check_cfg({"type": "td_vae", "kl_warmup": 10, "horizons": [1, 3], "context": 2})
    for bad, match in (({"horizon": [1]}, "unknown key"), ({"horizons": [0, 1]}, "horizons"),
                       ({"kl_warmup": -1}, "kl_warmup"), ({"context": 0}, "context")):
        with pytest.raises(ValueError, match=match):
            objective.check_cfg(bad)
