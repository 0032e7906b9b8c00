"""End-to-end check (notes fig. 2-3): a small ε-prediction MLP DDPM trained on the 2-D Swiss roll on CPU.

Samples from 1000-step ancestral, 50-step strided (respaced) ancestral, 50-step DDIM sampling and 50-level
annealed Langevin (eq. 32 with the score of eq. 33, 3 steps per level) must be within SW_THRESHOLD (sliced
2-Wasserstein) of held-out Swiss-roll data, while the same samplers driven by the untrained network must be
far outside it. Measured when written (seeded, 2 CPUs): trained ≈ 0.056 / 0.058 / 0.073 / 0.075,
untrained > 100, N(0, I) ≈ 0.32, data vs data ≈ 0.02.

Bits/dim: the data are continuous, so L_0 uses a continuous Gaussian decoder (``decoder="gaussian"``)
and the bound is on the differential entropy in bits per dimension. The trained model must beat an
untrained one and the best single Gaussian fitted to the held-out data (measured ≈ 1.0 vs ≈ 2.0 bits).
"""

import math
import time

import numpy as np
import pytest
import torch

from pipeline.data.swissroll import sliced_wasserstein, swiss_roll
from pipeline.diffusion import Schedule, nll_bits_per_dim
from pipeline.toy import TimeMLP, sample_points, train_ddpm

T = 1000
TRAIN_STEPS = 4000
BATCH = 512
N_SAMPLES = 2000
SW_THRESHOLD = 0.15


@pytest.fixture(scope="module")
def ddpm():
    s = Schedule.make("linear", T)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, untrained = TimeMLP(), TimeMLP()
    data = torch.from_numpy(swiss_roll(20_000, seed=1))
    start = time.perf_counter()
    losses = train_ddpm(model, s, data, steps=TRAIN_STEPS, batch_size=BATCH, seed=0, parameterization="eps")
    train_seconds = time.perf_counter() - start
    model.eval()
    return {
        "s": s,
        "model": model,
        "untrained": untrained,
        "heldout": swiss_roll(N_SAMPLES, seed=2),
        "losses": losses,
        "train_seconds": train_seconds,
    }


def _sample(which: str, model_fn, s: Schedule) -> np.ndarray:
    sampler = which.split("_")[0]  # ancestral_1000 → ancestral (all T steps), strided_50 → strided, ...
    return sample_points(model_fn, s, sampler, N_SAMPLES, steps=50, eta=0.0, seed=1)


def test_training_converged(ddpm):
    losses = ddpm["losses"]
    assert np.mean(losses[:50]) > 0.6  # ≈ 1 at the start: predicting ε ~ N(0, I) from nothing
    assert np.mean(losses[-500:]) < 0.35
    assert ddpm["train_seconds"] < 240  # typically ≈ 20-30 s on 2 cores; loose for busy machines


def test_threshold_is_meaningful(ddpm):
    heldout = ddpm["heldout"]
    assert sliced_wasserstein(swiss_roll(N_SAMPLES, seed=3), heldout) < SW_THRESHOLD / 3
    gaussian = np.random.default_rng(0).standard_normal((N_SAMPLES, 2))
    assert sliced_wasserstein(gaussian, heldout) > 1.5 * SW_THRESHOLD


@pytest.mark.parametrize("sampler", ["ancestral_1000", "strided_50", "ddim_50", "langevin_50"])
def test_samples_match_swiss_roll(ddpm, sampler):
    heldout = ddpm["heldout"]
    with torch.no_grad():
        trained = _sample(sampler, ddpm["model"], ddpm["s"])
        untrained = _sample(sampler, ddpm["untrained"], ddpm["s"])
    sw_trained = sliced_wasserstein(trained, heldout)
    sw_untrained = sliced_wasserstein(untrained, heldout)
    assert np.isfinite(trained).all()
    assert sw_trained < SW_THRESHOLD, sw_trained
    assert not sw_untrained < 3 * SW_THRESHOLD, sw_untrained  # also catches NaN


def test_bits_per_dim_trained_beats_untrained_and_gaussian(ddpm):
    x0 = torch.from_numpy(ddpm["heldout"][:500])
    kwargs = dict(parameterization="eps", learn_sigma=False, var_type="beta", decoder="gaussian")
    with torch.no_grad():
        bpd = nll_bits_per_dim(
            ddpm["model"], ddpm["s"], x0, noise_generator=torch.Generator().manual_seed(0), **kwargs
        ).mean()
        bpd_untrained = nll_bits_per_dim(
            ddpm["untrained"], ddpm["s"], x0, noise_generator=torch.Generator().manual_seed(0), **kwargs
        ).mean()
    assert torch.isfinite(bpd)
    assert bpd < bpd_untrained - 2.0, (bpd, bpd_untrained)
    cov = np.cov(ddpm["heldout"].T.astype(np.float64))
    gaussian_bpd = 0.5 * math.log2((2 * math.pi * math.e) ** 2 * np.linalg.det(cov)) / 2
    assert bpd < gaussian_bpd - 0.3, (bpd, gaussian_bpd)
