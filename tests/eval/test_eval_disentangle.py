"""MIG (Chen et al. 2018): perfect codes, random codes, a hand-computed example, input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.eval.disentangle import discretize, factor_entropies, mig


def _grid_factors(sizes: tuple[int, ...]) -> np.ndarray:
    return np.array(list(np.ndindex(*sizes)), dtype=np.int64)


def test_codes_copying_the_factors_score_one() -> None:
    factors = _grid_factors((4, 3, 4, 8, 8))  # the sprites grid: exactly independent factors
    rng = np.random.default_rng(0)
    # one latent per factor (a scaled, shifted copy of it, plus tiny noise), in a shuffled order
    codes = np.stack([(k + 1) * factors[:, k] - 3.0 * k for k in range(5)], 1).astype(float)
    codes = codes[:, [3, 0, 4, 1, 2]] + rng.normal(0, 1e-6, codes.shape)
    assert mig(codes, factors) == pytest.approx(1.0, abs=0.02)


def test_random_codes_score_near_zero() -> None:
    factors = _grid_factors((4, 3, 4, 8, 8))
    codes = np.random.default_rng(1).normal(size=(len(factors), 6))
    assert 0.0 <= mig(codes, factors) < 0.03


def test_one_latent_carrying_two_factors_has_no_gap_for_either() -> None:
    factors = _grid_factors((4, 4)).repeat(10, 0)
    both = factors[:, 0] * 4 + factors[:, 1]  # a single latent that encodes both factors
    codes = np.stack([both, both + 0.0], 1).astype(float)  # ... twice: top two latents are tied
    assert mig(codes, factors, bins=16) == pytest.approx(0.0, abs=1e-12)


def _h(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def test_hand_computed_example() -> None:
    # v = [0,0,1,1]; z1 = [0,0,0,1] tells part of v, z2 = [0,1,0,1] is independent of v.
    v = np.array([0, 0, 1, 1])
    z = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    # I(z1; v) = H(z1) − H(z1 | v) = H(3/4, 1/4) − [1/2·H(1) + 1/2·H(1/2, 1/2)]; I(z2; v) = 0; H(v) = ln 2
    i1 = _h([0.75, 0.25]) - 0.5 * _h([0.5, 0.5])
    expected = (i1 - 0.0) / math.log(2)
    assert mig(z, v[:, None], bins=2) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(0.3113, abs=1e-4)
    # a second factor w = z2 exactly: its gap is H(w)/H(w) − I(z1; w)/H(w), with I(z1; w) by hand
    w = np.array([0, 1, 0, 1])
    i1w = _h([0.75, 0.25]) - 0.5 * _h([1.0]) - 0.5 * _h([0.5, 0.5])
    both = mig(z, np.stack([v, w], 1), bins=2)
    assert both == pytest.approx((expected + (math.log(2) - i1w) / math.log(2)) / 2, rel=1e-9)


def test_discretize_equal_width_bins_and_entropy() -> None:
    x = np.array([[0.0], [0.24], [0.26], [0.5], [0.74], [1.0]])
    np.testing.assert_array_equal(discretize(x, bins=4)[:, 0], [0, 0, 1, 2, 2, 3])
    np.testing.assert_allclose(factor_entropies(np.array([[0, 5], [1, 5], [1, 5], [2, 5]])),
                               [_h([0.25, 0.5, 0.25]), 0.0])


def test_constant_factor_is_skipped_and_bad_input_is_refused() -> None:
    factors = _grid_factors((4, 4))
    codes = factors.astype(float)
    with_const = np.concatenate([factors, np.zeros((len(factors), 1), np.int64)], 1)
    assert mig(codes, with_const) == pytest.approx(mig(codes, factors))
    with pytest.raises(ValueError, match="two latent"):
        mig(codes[:, :1], factors)
    with pytest.raises(ValueError, match="same N"):
        mig(codes[:-1], factors)
    with pytest.raises(ValueError, match="NaN"):
        mig(np.full_like(codes, np.nan), factors)
