"""Disentanglement: the Mutual Information Gap (MIG, Chen et al. 2018, "Isolating Sources of Disentanglement").

For each ground-truth factor v_k, the latent dimensions are ranked by their mutual information with v_k;
MIG is the gap between the top two, normalised by the factor's entropy, averaged over the factors:

    MIG = 1/K Σ_k (I(z_{j_k}; v_k) − max_{j ≠ j_k} I(z_j; v_k)) / H(v_k),   j_k = argmax_j I(z_j; v_k)

A disentangled code (one latent per factor, which says nothing about the others) scores near 1,
an entangled or uninformative one near 0. Continuous latents are discretised into equal-width
histogram bins first (as in Chen et al.'s and Locatello et al.'s estimators).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import mutual_info_score


def discretize(codes: np.ndarray, bins: int = 20) -> np.ndarray:
    """Each column of ``codes`` (N, D) mapped to its equal-width histogram bin index 0..bins-1 -> (N, D) int."""
    codes = np.asarray(codes, dtype=np.float64)
    if codes.ndim != 2:
        raise ValueError(f"codes must be (N, D), got shape {codes.shape}")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    out = np.empty(codes.shape, dtype=np.int64)
    for j in range(codes.shape[1]):
        edges = np.histogram_bin_edges(codes[:, j], bins=bins)
        out[:, j] = np.clip(np.digitize(codes[:, j], edges[1:-1]), 0, bins - 1)
    return out


def mutual_info_matrix(discrete_codes: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """I(z_j; v_k) in nats for every latent column j and factor column k -> (D, K)."""
    d, k = discrete_codes.shape[1], factors.shape[1]
    return np.array([[mutual_info_score(factors[:, b], discrete_codes[:, a]) for b in range(k)] for a in range(d)])


def factor_entropies(factors: np.ndarray) -> np.ndarray:
    """H(v_k) in nats of each discrete factor column -> (K,)."""
    out = []
    for col in factors.T:
        _, counts = np.unique(col, return_counts=True)
        p = counts / counts.sum()
        out.append(float(-(p * np.log(p)).sum()))
    return np.array(out)


def mig(codes: np.ndarray, factors: np.ndarray, bins: int = 20) -> float:
    """Mutual Information Gap of latent ``codes`` (N, D) w.r.t. discrete ``factors`` (N, K); in [0, 1].

    Factor values are used as categories (any hashable numbers); a factor with a single value carries no
    information and is left out. Needs at least two latent dimensions.
    """
    codes, factors = np.asarray(codes), np.asarray(factors)
    if factors.ndim == 1:
        factors = factors[:, None]
    if codes.ndim != 2 or factors.ndim != 2 or len(codes) != len(factors):
        raise ValueError(f"codes (N, D) and factors (N, K) must have the same N, got {codes.shape} and "
                         f"{factors.shape}")
    if codes.shape[1] < 2:
        raise ValueError("MIG needs at least two latent dimensions (the gap between the top two)")
    if not np.isfinite(codes).all():
        raise ValueError("codes contain NaN or Inf")
    cats = np.stack([np.unique(col, return_inverse=True)[1] for col in factors.T], 1)
    entropy = factor_entropies(cats)
    keep = entropy > 0
    if not keep.any():
        raise ValueError("every factor is constant: MIG is undefined")
    mi = mutual_info_matrix(discretize(codes, bins), cats[:, keep])  # (D, K)
    top2 = np.sort(mi, axis=0)[::-1][:2]  # (2, K): the best and second-best latent per factor
    return float(np.mean((top2[0] - top2[1]) / entropy[keep]))
