"""Swiss-roll data and the sliced Wasserstein distance."""

import numpy as np
import pytest

from pipeline.data.swissroll import sliced_wasserstein, swiss_roll


def test_swiss_roll_shape_determinism_and_scale():
    a = swiss_roll(5000, seed=3)
    assert a.shape == (5000, 2) and a.dtype == np.float32
    assert np.array_equal(a, swiss_roll(5000, seed=3))
    assert not np.array_equal(a, swiss_roll(5000, seed=4))
    assert np.all((a.std(0) > 0.8) & (a.std(0) < 1.2))
    r = np.linalg.norm(a, axis=1)  # radius = t / scale, t in [1.5π, 4.5π]
    assert r.min() >= 1.5 * np.pi / 7 - 1e-5 and r.max() <= 4.5 * np.pi / 7 + 1e-5
    noisy = swiss_roll(5000, seed=3, noise=0.1)
    assert np.std(noisy - a) == pytest.approx(0.1, rel=0.05)


def test_sliced_wasserstein_known_values():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3000, 2))
    assert sliced_wasserstein(a, a) == 0.0
    shift = np.array([0.6, 0.0])
    # Shifting by c gives W2 = |c·u| on direction u; averaged over directions: |c| / √2 in 2-D.
    sw = sliced_wasserstein(a, a + shift, n_projections=500)
    assert sw == pytest.approx(0.6 / np.sqrt(2), rel=0.05)
    b = rng.standard_normal((1000, 2))
    assert sliced_wasserstein(a, b) == pytest.approx(sliced_wasserstein(b, a))
    assert sliced_wasserstein(a, b) < 0.1
    assert sliced_wasserstein(a, 2 * b) > 0.5
    # Unequal sizes compare at common quantile levels: duplicating every point changes nothing.
    assert sliced_wasserstein(a, np.repeat(a, 2, axis=0)) < 0.01
    assert sliced_wasserstein(a, a[::3]) < 0.1
