"""VQ-VAE (eq. 11-13): lookup, straight-through, loss, EMA codebook, restarts, statistics, all-reduce, training."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.models import build_model
from pipeline.models.vqvae import VectorQuantizer
from pipeline.objectives.vq import (
    code_stats,
    code_usage,
    ema_update,
    laplace_smoothed,
    nearest_code,
    normalised_codebook,
    perplexity,
    vq_loss,
)

ROOT = Path(__file__).resolve().parents[2]


def test_nearest_code_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    z, codebook = torch.randn(200, 3, generator=g), torch.randn(17, 3, generator=g)
    brute = [min(range(17), key=lambda i, row=row: float(((row - codebook[i]) ** 2).sum())) for row in z]
    assert nearest_code(z, codebook).tolist() == brute


def test_straight_through_gradient_equals_decoder_input_gradient():
    q = VectorQuantizer(8, 4).eval()
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_st, z_q, codes = q(z_e)
    # forward: exactly the nearest codes (eq. 11)
    flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(z_st.detach(), q.codebook[nearest_code(flat, q.codebook)].view(2, 3, 3, 4)
                               .permute(0, 3, 1, 2))
    torch.testing.assert_close(z_st.detach(), z_q.detach())  # z_e + (z_q - z_e): equal up to rounding
    z_st.retain_grad()
    w = torch.randn_like(z_st)
    (torch.sin(z_st) * w).sum().backward()  # any downstream "decoder"
    assert z_st.grad is not None and z_st.grad.abs().sum() > 0
    torch.testing.assert_close(z_e.grad, z_st.grad, rtol=0, atol=0)


def test_vq_loss_terms_and_gradient_by_hand():
    x, x_hat = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.5, -0.5]])
    z_e = torch.tensor([[2.0, 0.0]], requires_grad=True)
    z_q = torch.tensor([[1.0, 1.0]], requires_grad=True)
    out = vq_loss(x, x_hat, [z_e], [z_q], beta=0.25)
    assert out["recon"].item() == pytest.approx(0.25)  # (0.5² + 0.5²) / 2
    assert out["commit"].item() == pytest.approx(1.0)  # (1² + 1²) / 2
    assert out["loss"].item() == pytest.approx(0.25 + 0.25 * 1.0)
    out["loss"].backward()
    # d/dz_e β·mean((z_e - sg z_q)²) = β · 2 (z_e - z_q) / 2; the codebook gets nothing without the VQ term
    torch.testing.assert_close(z_e.grad, 0.25 * (z_e - z_q).detach())
    assert z_q.grad is None
    with_codebook = vq_loss(x, x_hat, [z_e], [z_q], beta=0.25, codebook_loss=True)
    assert with_codebook["loss"].item() == pytest.approx(0.5 + 1.0)
    with_codebook["loss"].backward()
    torch.testing.assert_close(z_q.grad, (z_q - z_e).detach())  # 2 (e - sg z_e) / 2


def test_ema_update_by_hand():
    """Codebook e = [(0,0), (10,10)], N = [1, 1], m = e; batch z = (1,0), (0,1), (9,9); γ = 0.5, ε = 0.1."""
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]])
    codebook = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    codes = nearest_code(z, codebook)
    assert codes.tolist() == [0, 0, 1]
    counts, sums = code_stats(z, codes, 2)
    assert counts.tolist() == [2.0, 1.0] and sums.tolist() == [[1.0, 1.0], [9.0, 9.0]]
    n, m = ema_update(torch.ones(2), codebook.clone(), counts, sums, decay=0.5)
    assert n.tolist() == [1.5, 1.0]  # 0.5·1 + 0.5·2, 0.5·1 + 0.5·1
    assert m.tolist() == [[0.5, 0.5], [9.5, 9.5]]
    # Laplace: (N + ε) / (ΣN + Kε) · ΣN = 1.6/2.7·2.5, 1.1/2.7·2.5
    smoothed = [1.6 / 2.7 * 2.5, 1.1 / 2.7 * 2.5]
    assert laplace_smoothed(n, 0.1).tolist() == pytest.approx(smoothed)
    expected = [[0.5 / smoothed[0]] * 2, [9.5 / smoothed[1]] * 2]
    assert normalised_codebook(n, m, 0.1).tolist() == [pytest.approx(r) for r in expected]

    # the module does the same in its training-mode forward (after the lookup with the old codebook)
    q = VectorQuantizer(2, 2, decay=0.5, eps=0.1, restart_after=0, data_init=False)
    q.codebook.copy_(codebook)
    q.embed_sum.copy_(codebook)
    q.cluster_size.fill_(1.0)
    _, z_q, out_codes = q.train()(z.t().reshape(1, 2, 3, 1))
    assert out_codes.flatten().tolist() == [0, 0, 1]
    assert z_q.permute(0, 2, 3, 1).reshape(3, 2).tolist() == [[0, 0], [0, 0], [10, 10]]
    assert q.cluster_size.tolist() == [1.5, 1.0]
    assert q.codebook.tolist() == [pytest.approx(r) for r in expected]
    # eval mode never moves the codebook
    before = q.codebook.clone()
    q.eval()(z.t().reshape(1, 2, 3, 1))
    assert torch.equal(q.codebook, before)


def test_dead_code_restart_from_batch_encoder_outputs():
    q = VectorQuantizer(3, 2, decay=0.9, restart_after=2, data_init=False)
    far = torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, -100.0]])
    q.codebook.copy_(far)
    q.embed_sum.copy_(far)
    z = torch.tensor([[0.1, 0.0], [0.9, 1.1], [0.0, 0.2], [1.2, 0.8]]).t().reshape(1, 2, 4, 1)
    q.train()(z)
    assert q.unused.tolist() == [0, 0, 1]
    assert q.codebook[2].tolist() == pytest.approx([100.0, -100.0], rel=1e-3)  # unused for 1 step: kept
    q(z)
    rows = z.permute(0, 2, 3, 1).reshape(4, 2)
    # unused for 2 steps: re-initialised at one of this batch's encoder outputs, with N = 1 and m = e
    assert any(torch.equal(q.codebook[2], r) for r in rows)
    assert torch.equal(q.embed_sum[2], q.codebook[2]) and q.cluster_size[2].item() == 1.0
    assert q.unused.tolist() == [0, 0, 0]


def test_perplexity_and_usage():
    assert perplexity(torch.tensor([2, 2, 0, 0])) == pytest.approx(2.0)
    assert perplexity(torch.tensor([5, 5, 5, 5])) == pytest.approx(4.0)
    assert perplexity(torch.tensor([3, 1])) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert perplexity(torch.tensor([7, 0, 0])) == pytest.approx(1.0)
    assert code_usage(torch.tensor([2, 2, 0, 0])) == 0.5


# ----------------------------------------------------------------------------- all-reduce over 2 gloo processes


def _data(rank: int) -> torch.Tensor:
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(100 + rank)) + rank


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different global RNG per rank, as in the training loop
    ema = VectorQuantizer(6, 3, decay=0.8, eps=1e-3, restart_after=0, data_init=False).train()
    for _ in range(3):
        ema(_data(rank))
    restart = VectorQuantizer(6, 3, decay=0.8, restart_after=1, data_init=True).train()
    for _ in range(3):
        restart(_data(rank) * (1 + rank))
    torch.save({"ema": ema.state_dict(), "restart": restart.state_dict()}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_codebook_statistics_all_reduced_across_two_gloo_workers(tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for part in ("ema", "restart"):  # every rank holds the same codebook
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), (part, k)
    # ... equal to one process updating on the concatenated data
    single = VectorQuantizer(6, 3, decay=0.8, eps=1e-3, restart_after=0, data_init=False).train()
    for _ in range(3):
        single(torch.cat([_data(0), _data(1)]))
    for k, v in single.state_dict().items():
        torch.testing.assert_close(r0["ema"][k].to(v.dtype), v, rtol=1e-5, atol=1e-5)
    assert r0["restart"]["initialized"].item() == 1


# ----------------------------------------------------------------------------- training


def _digits(n: int) -> torch.Tensor:
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images[:n].astype(np.float32)) / 16.0 * 2 - 1
    return x.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None]  # 8x8 -> 16x16, in [-1, 1]


def test_ldm_spec_with_vq_autoencoder_validates_and_vq_vae_reconstructs():
    """The LDM job with the VQ-VAE as its first stage; that model learns a tiny batch without collapsing."""
    from pipeline.config import load_spec
    from pipeline.objectives import get_objective

    spec = load_spec(ROOT / "jobs" / "ldm.yaml", [
        "stages.autoencoder.model.name=vq_vae", "stages.autoencoder.objective={type: vq, beta: 0.25}",
        "stages.autoencoder.model.args.num_codes=32", "stages.autoencoder.model.args.base_channels=16"])
    ae = spec.stages["autoencoder"]
    assert ae.model.name == "vq_vae" and ae.objective["type"] == "vq"
    torch.manual_seed(0)
    model = build_model(ae.model.name, **ae.model.args)
    x = _digits(32)
    z_e, none = model.encode(x)
    assert none is None and z_e.shape[1] == spec.stages["diffusion"].model.args["in_channels"]

    objective = get_objective("vq")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(40):
        loss, _ = objective.loss(model.train(), {"image": x, "label": torch.zeros(32)}, None, dict(ae.objective))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        recon = model.decode(model.encode(x)[0])  # the encode stage's latents → the Generator's decode
        codes = model.encode_codes(x)[0]
        torch.testing.assert_close(model.decode_codes([codes]), recon)
    mse, baseline = float(((recon - x) ** 2).mean()), float(((x - x.mean(0)) ** 2).mean())
    assert mse < 0.5 * baseline, (mse, baseline)
    counts = torch.bincount(codes.flatten(), minlength=32)
    assert perplexity(counts) > 4 and code_usage(counts) > 0.25, counts.tolist()


def test_codebook_learnt_by_the_vq_term_without_ema():
    from pipeline.objectives import get_objective

    model = build_model("vq_vae", base_channels=8, latent_channels=2, num_codes=8, ema=False)
    q = model.quantizers[0]
    assert isinstance(q.codebook, torch.nn.Parameter) and not model.ema
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    loss, _ = get_objective("vq").loss(model.train(), {"image": x}, None, {"beta": 0.25})
    loss.backward()
    z_e = model.encoder(x).detach()
    z_q, codes = q.lookup(z_e)
    # only the codebook term reaches the codebook: d/de mean((e_k - sg z_e)²) summed over the assigned positions
    expected = torch.zeros_like(q.codebook)
    diff = (z_q - z_e).permute(0, 2, 3, 1).reshape(-1, 2) * 2 / z_e.numel()
    expected.index_add_(0, codes.flatten(), diff.detach())
    torch.testing.assert_close(q.codebook.grad, expected)
