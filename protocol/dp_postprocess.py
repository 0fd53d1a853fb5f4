"""Coordinator-side clean-up of noisy sums before the scorers read them (DP post-processing).

Under DP each site adds Gaussian noise to every block it releases, so the pooled sums can
break what the scorers assume: a negative count, a Gram matrix with negative eigenvalues, a
negative squared sum. The repairs below are the usual ones; anything computed from
released values alone is post-processing and costs no privacy. Applied to a block only
when its noise standard deviation is positive, so exact (DP-off) sums pass through
untouched:

- ``count`` and ``class_counts``: at least 1 (a class with no rows would divide by zero);
- ``gram`` and each class of ``class_scatters``: symmetric, eigenvalues raised to at least
  ``2 sigma sqrt(d)``, the expected spectral norm of a symmetric d x d matrix of N(0,
  sigma^2) noise (the semicircle law's edge). Raising eigenvalues below the noise level to
  that level regularises the directions the noise dominates, so no scorer divides by a
  noise-sized eigenvalue (LogME's evidence turns NaN when it does);
- sums of non-negative terms (``class_sq_sums``, ``hard_joint``, ``soft_joint``,
  ``norm4_sum``, ``true_class_prob_sum``, ``tilted_joint``, ``gmm_soft_joint``): at least 0.

``sigma`` of a pooled block is sqrt(sum over sites of sigma_site^2), the per-entry noise each
site declared for that block (its audit record's ``noise_std``; public, since it follows
from the site's policy and the request).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedmte.protocol import symmetric
from fedmte.protocol.requests import Stat
from fedmte.protocol.statistics import Statistics

AT_LEAST_ONE = frozenset({"count", "class_counts"})
NON_NEGATIVE = frozenset({
    "class_sq_sums", "hard_joint", "soft_joint", "norm4_sum", "true_class_prob_sum", "tilted_joint", "gmm_soft_joint",
})
PSD = frozenset({"gram", "class_scatters"})


def pooled_sigma(per_site: Sequence[float]) -> float:
    """The noise std of a sum of independently noised blocks."""
    return math.sqrt(sum(float(s) ** 2 for s in per_site))


def eigen_floor(sigma: float, dim: int) -> float:
    """2 sigma sqrt(d): about the spectral norm of symmetric d x d N(0, sigma^2) noise."""
    return 2.0 * sigma * math.sqrt(dim)


def psd_floor(matrices: np.ndarray, floor: float) -> np.ndarray:
    """Symmetrise (..., d, d) matrices and raise every eigenvalue to at least ``floor``."""
    sym = 0.5 * (matrices + np.swapaxes(matrices, -1, -2))
    values, vectors = np.linalg.eigh(sym)
    values = np.maximum(values, floor)
    return (vectors * values[..., None, :]) @ np.swapaxes(vectors, -1, -2)  # V diag(values) V^T; matmul, 5x einsum


def clean_block(kind: str, value: np.ndarray, sigma: float) -> np.ndarray:
    """One pooled block after the repairs above (a new array; ``value`` is not changed)."""
    if not sigma > 0:
        return value
    if kind in AT_LEAST_ONE:
        return np.maximum(value, np.ones((), dtype=value.dtype))
    if kind in NON_NEGATIVE:
        return np.maximum(value, np.zeros((), dtype=value.dtype))
    if kind in PSD:
        full = symmetric.unpack(np.asarray(value, dtype=np.float64))
        return symmetric.pack(psd_floor(full, eigen_floor(sigma, full.shape[-1]))).astype(value.dtype)
    return value


def clean_sums(requests: Sequence[Stat], sums: Statistics, sigma: Mapping[str, float]) -> Statistics:
    """Every requested block of ``sums`` cleaned with its pooled noise std ``sigma[stat.key]``
    (missing: 0, left as is)."""
    return Statistics({stat.key: clean_block(stat.kind, sums[stat.key], float(sigma.get(stat.key, 0.0)))
                       for stat in {s.key: s for s in requests}.values()})


__all__ = ["clean_block", "clean_sums", "eigen_floor", "pooled_sigma", "psd_floor"]
