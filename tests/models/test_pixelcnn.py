"""Gated PixelCNN prior: causality without a blind spot (by gradients), conditioning, sampling, the prior task."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.models import build_model
from pipeline.models.pixelcnn import GatedPixelCNN
from pipeline.train.prior_task import PriorTask, code_nll, prior_args


def _dependence(net: GatedPixelCNN, size: int, y=None, cond=None) -> torch.Tensor:
    """dep[p, q] = True when the logits at raster position p have a non-zero gradient w.r.t. the input at q."""
    x = torch.randn(1, net.embed.embedding_dim, size, size, dtype=torch.float64, requires_grad=True)
    n = size * size
    dep = torch.zeros(n, n, dtype=torch.bool)
    for p in range(n):
        i, j = divmod(p, size)
        (g,) = torch.autograd.grad(net.forward_embedded(x, y, cond)[0, :, i, j].sum(), x)
        dep[p] = g[0].abs().sum(0).flatten() > 0
    return dep


def test_causal_without_blind_spot():
    torch.manual_seed(0)
    net = GatedPixelCNN(num_codes=5, num_classes=3, channels=8, num_layers=5, kernel_size=3).double()
    dep = _dependence(net, 5, y=torch.tensor([1]))
    n = dep.shape[0]
    strictly_before = torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=-1)
    assert not (dep & ~strictly_before).any(), "output at pixel i depends on an input at pixel >= i"
    assert dep[strictly_before].all(), "blind spot: some earlier pixel does not reach the output"


def test_bottom_level_is_causal_in_its_own_codes_given_the_top_codes():
    torch.manual_seed(0)
    prior = build_model("pixelcnn", num_codes=[4, 6], num_classes=2, channels=8, num_layers=5,
                        kernel_size=3).double()
    bottom = prior.levels[1]
    cond = bottom.condition(torch.randint(0, 4, (1, 2, 2)), (4, 4))
    dep = _dependence(bottom, 4, y=torch.tensor([0]), cond=cond)
    assert not (dep & ~torch.tril(torch.ones(16, 16, dtype=torch.bool), diagonal=-1)).any()


def test_class_and_top_codes_condition_the_logits():
    torch.manual_seed(0)
    prior = build_model("pixelcnn", num_codes=[4, 6], num_classes=3, channels=8, num_layers=2)
    top, bottom = torch.randint(0, 4, (1, 2, 2)), torch.randint(0, 6, (1, 4, 4))
    a = prior([top, bottom], torch.tensor([0]))
    b = prior([top, bottom], torch.tensor([2]))
    c = prior([(top + 1) % 4, bottom], torch.tensor([0]))
    assert [t.shape for t in a] == [(1, 4, 2, 2), (1, 6, 4, 4)]
    assert not torch.allclose(a[0][:, :, 0, 0], b[0][:, :, 0, 0])  # the class reaches even the first pixel
    assert torch.allclose(a[0], c[0]) is False and not torch.allclose(a[1][:, :, 0, 0], c[1][:, :, 0, 0])


def test_learns_and_samples_a_class_dependent_pattern():
    """codes[i, j] = (i + j + class) mod 3 is determined by the previous pixel and the class; after training,
    raster-order sampling reproduces it."""
    torch.manual_seed(0)
    prior = build_model("pixelcnn", num_codes=[3], num_classes=3, channels=16, num_layers=3, kernel_size=3)
    ii, jj = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    y = torch.arange(24) % 3
    codes = (ii[None] + jj[None] + y[:, None, None]) % 3
    opt = torch.optim.Adam(prior.parameters(), lr=1e-2)
    for _ in range(80):
        loss, _ = code_nll(prior([codes], y), [codes])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    (sampled,) = prior.sample(y[:6], [(4, 4)], generator=torch.Generator().manual_seed(0))
    assert (sampled == codes[:6]).float().mean() > 0.95


def test_code_nll_by_hand_and_prior_args():
    logits = [torch.zeros(2, 4, 3, 3), torch.zeros(2, 8, 2, 2)]
    codes = [torch.zeros(2, 3, 3, dtype=torch.long), torch.zeros(2, 2, 2, dtype=torch.long)]
    total, per = code_nll(logits, codes)
    assert per[0].item() == pytest.approx(math.log(4)) and per[1].item() == pytest.approx(math.log(8))
    assert total.item() == pytest.approx((9 * math.log(4) + 4 * math.log(8)) / 13)  # mean over every code
    assert prior_args({"channels": 8}, [4, 8], 10) == {"channels": 8, "num_codes": [4, 8], "num_classes": 10}
    with pytest.raises(ValueError, match="num_codes"):
        prior_args({"num_codes": [4]}, [4, 8], 10)


def test_prior_task_trains_on_frozen_vq_codes():
    torch.manual_seed(0)
    vq = build_model("vq_vae2", base_channels=8, latent_channels=2, num_codes=[4, 6])
    stage = {"model": {"name": "pixelcnn", "args": {"channels": 8, "num_layers": 2}}}
    task = PriorTask(stage, vq, {"name": "vq_vae2"}, num_classes=10, data={"code_shapes": [[2, 2], [4, 4]]})
    prior = task.build_model()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    batch = {"image": torch.rand(4, 1, 8, 8) * 2 - 1, "label": torch.tensor([0, 1, 2, 3])}
    loss, parts = task.loss(prior, batch, None)
    loss.backward()
    assert set(parts) == {"bits_per_code", "bits_per_code_top", "bits_per_code_bottom"}
    assert all(p.grad is not None for p in prior.parameters() if p.requires_grad)
    assert all(torch.equal(v, vq.state_dict()[k]) for k, v in before.items())  # the codebooks did not move
    assert task.export_extra()["code_shapes"] == [[2, 2], [4, 4]]
    with pytest.raises(ValueError, match="no discrete codes"):
        PriorTask(stage, build_model("kl_vae", base_channels=8), {"name": "kl_vae"}, num_classes=10)


def test_prior_stage_spec_validation():
    from pathlib import Path

    from pipeline.config import SpecError, load_spec

    job = Path(__file__).resolve().parents[2] / "jobs" / "vqvae2.yaml"
    spec = load_spec(job)
    assert spec.stages["prior"].kind == "prior" and spec.stages["prior"].needs == ["autoencoder"]
    with pytest.raises(SpecError, match=r"stages\.prior\.needs: .*objective.type vq, but 'classifier'"):
        load_spec(job, ["stages.prior.needs=[classifier]"])
    with pytest.raises(SpecError, match="objective.type vq"):  # a KL-VAE has no codes to model
        load_spec(job, ["stages.autoencoder.objective={type: kl_vae}"])
    with pytest.raises(SpecError, match=r"stages\.prior: a prior stage needs exactly one stage"):
        load_spec(job, ["stages.prior.needs=[]"])
    with pytest.raises(SpecError, match=r"stages\.prior\.sampling\.temperature"):
        load_spec(job, ["stages.prior.sampling.temperature=0"])
