"""Public projections of the features to fewer dimensions before anything is summed.

Under DP the noise on a Gram block grows with its d(d+1)/2 entries while the signal does
not, so for covariance scorers fewer dimensions can mean a truer ranking (research notes,
privacy section 4.8). A projection the coordinator broadcasts is a ``project`` view step
(:mod:`fedmte.protocol.catalogue`) that every request of a model's plan starts with
(:class:`fedmte.protocol.plan.PlanRun`, ``projection``). It must be public, so it is drawn
from a seed both sides can name, never from the data. An orthonormal basis has spectral norm
1, so clipped rows stay within the clip norm and the sensitivities do not change
(:func:`fedmte.protocol.dp.row_bound`).
"""

from __future__ import annotations

import hashlib

import numpy as np

from fedmte.protocol.errors import InvalidInputError


def projection_seed(run_id: str, model_id: str) -> int:
    """The public seed of one model's projection in one run."""
    return int.from_bytes(hashlib.sha256(f"fedmte.projection:{run_id}:{model_id}".encode()).digest()[:8], "big")


def random_basis(dim: int, k: int, seed: int) -> np.ndarray:
    """A (dim, k) basis with orthonormal columns, uniform over such bases (QR of a Gaussian
    matrix, signs fixed so the draw is a function of the seed alone)."""
    if not 1 <= k <= dim:
        raise InvalidInputError(f"a projection to k = {k} dimensions needs 1 <= k <= {dim}, the features' dimension")
    gaussian = np.random.default_rng(seed).standard_normal((dim, k))
    q, r = np.linalg.qr(gaussian)
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)
