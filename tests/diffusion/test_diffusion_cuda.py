"""Device checks: float64 CPU tables combined with CUDA tensors (skipped without CUDA)."""

import pytest
import torch
from torch import nn

from pipeline.diffusion import (
    Schedule,
    classifier_free,
    classifier_grad,
    diffusion_loss,
    nll_bits_per_dim,
    progressive_distillation_target,
    sample_ancestral,
    sample_ddim,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Net(nn.Module):
    def __init__(self, out_channels: int = 2, classes: int = 0):
        super().__init__()
        self.classes = classes
        self.net = nn.Sequential(nn.Linear(3 + classes, 64), nn.SiLU(), nn.Linear(64, out_channels))

    def forward(self, x, t, y=None):
        feats = [x, t.float()[:, None] / 1000]
        if self.classes:
            feats.append(nn.functional.one_hot(y, self.classes).float())
        return self.net(torch.cat(feats, dim=1))


def test_cuda_training_step_and_likelihood():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    s = Schedule.make("cosine", 1000)
    model = Net(out_channels=4).to(dev)  # learned sigma
    x0 = torch.randn(64, 2, device=dev)
    t = torch.randint(0, 1000, (64,), device=dev)
    res = diffusion_loss(model, s, x0, t, parameterization="v", loss_type="hybrid", learn_sigma=True)
    assert all(v.device.type == "cuda" and v.dtype == torch.float32 for v in res.values())
    res["loss"].mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    r = s.respace(25)
    gen = torch.Generator(device=dev).manual_seed(0)
    bpd = nll_bits_per_dim(model, r, x0, parameterization="v", learn_sigma=True, noise_generator=gen)
    assert bpd.device.type == "cuda" and torch.isfinite(bpd).all()


def test_cuda_samplers_match_cpu():
    torch.manual_seed(0)
    s = Schedule.make("linear", 1000)
    cpu_model, cpu_clf = Net(classes=3), Net(out_channels=3)
    gpu_model, gpu_clf = Net(classes=3).cuda(), Net(out_channels=3).cuda()
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_clf.load_state_dict(cpu_clf.state_dict())
    xT = torch.randn(32, 2)
    y = torch.randint(0, 3, (32,))
    outs = []
    for model, clf, dev in [(cpu_model, cpu_clf, "cpu"), (gpu_model, gpu_clf, "cuda")]:
        fn = classifier_free(model, y.to(dev), 2, w=1.5)
        cond = classifier_grad(clf, y.to(dev))
        outs.append(sample_ddim(fn, s, xT.to(dev), 20, cond_fn=cond, guidance_scale=0.5).cpu())
        gen = torch.Generator(device=dev).manual_seed(0)
        anc = sample_ancestral(fn, s.respace(20), (32, 2), generator=gen, device=dev, cond_fn=cond, guidance_scale=0.5)
        assert anc.device.type == dev and torch.isfinite(anc).all()
        full = [torch.full((32,), v, device=dev) for v in (999, 500, -1)]
        tgt = progressive_distillation_target(s, fn, xT.to(dev), *full, teacher_parameterization="eps")
        assert tgt.device.type == dev and torch.isfinite(tgt).all()
    assert torch.allclose(outs[0], outs[1], atol=1e-3, rtol=1e-3)
