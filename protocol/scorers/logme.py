"""LogME: the log marginal evidence of a Bayesian linear model from features to labels.

Follows thuml/LogME ``LogME.fit`` (the fixed-point variant, ``_fit_fixed_point``) on the raw,
uncentred features, from ``F^T F`` and ``F^T Y`` alone.

References: You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer
Learning", ICML 2021; You et al., "Ranking and Tuning Pre-trained Models", JMLR 2022.
"""

from __future__ import annotations

import numpy as np

from fedmte.protocol.scorers.base import Context, Program, ScorerSpec
from fedmte.protocol.scorers.moments import Moments, moment_requests

EPSILON = 1e-5
MAX_PASSES = 11
TOLERANCE = 1e-3


def spectrum(gram: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Squared singular values ``sigma`` (k,) and right singular vectors (d, k) of F.

    As in the reference, k = n when n <= d (the top n) and k = d otherwise. Directions at
    the rounding-noise level of F^T F (eigenvalue below d * eps * lambda_max: dead feature
    columns, rank deficiency) get sigma = 0 exactly. The reference keeps them as noise
    (their square roots, ~1e-7, pass its 1e-10 test) with projections ~1e-8, so its value
    tends to this limit; from sums the noise would change with the site split.
    """
    eigvals, eigvecs = np.linalg.eigh(gram)
    eigvals, eigvecs = eigvals[::-1], eigvecs[:, ::-1]
    noise_floor = gram.shape[0] * np.finfo(np.float64).eps * max(float(eigvals[0]), 0.0)
    eigvals = np.where(eigvals > noise_floor, eigvals, 0.0)
    keep = min(n, gram.shape[0])
    return eigvals[:keep], eigvecs[:, :keep]


def class_evidence(sigma: np.ndarray, x: np.ndarray, y_norm2: float, n: int, d: int) -> float:
    """Maximised evidence per sample for one target column, given x = U^T y."""
    x2 = x * x
    # ||y||^2 - ||U^T y||^2 >= 0 for exact sums; DP noise on the counts can push it below.
    residual_x2 = max(y_norm2 - x2.sum(), 0.0)
    alpha, beta = 1.0, 1.0
    for _ in range(MAX_PASSES):
        t = alpha / beta
        gamma = (sigma / (sigma + t)).sum()
        m2 = (sigma * x2 / (t + sigma) ** 2).sum()
        res2 = (x2 / (1 + sigma / t) ** 2).sum() + residual_x2
        alpha = gamma / (m2 + EPSILON)
        beta = (n - gamma) / (res2 + EPSILON)
        if abs(alpha / beta - t) / t <= TOLERANCE:
            break
    evidence = (
        d / 2.0 * np.log(alpha)
        + n / 2.0 * np.log(beta)
        - 0.5 * np.sum(np.log(alpha + beta * sigma))
        - beta / 2.0 * res2
        - alpha / 2.0 * m2
        - n / 2.0 * np.log(2 * np.pi)
    )
    return float(evidence / n)


def logme_from_moments(gram: np.ndarray, class_sums: np.ndarray, counts: np.ndarray) -> float:
    """LogME of raw features from F^T F (d, d), class sums (C, d) and class counts (C,)."""
    n, d = int(counts.sum()), gram.shape[0]
    sigma, vectors = spectrum(gram, n)
    singular = np.sqrt(sigma)
    # x = U^T y_c with U = F V diag(1/s), so x = diag(1/s) V^T F^T y_c = diag(1/s) V^T s_c;
    # null directions (s = 0) carry no signal: x = 0 there.
    projected = np.zeros((len(class_sums), len(sigma)))
    live = singular > 0
    projected[:, live] = (class_sums @ vectors[:, live]) / singular[live]
    return float(np.mean([class_evidence(sigma, projected[c], float(counts[c]), n, d) for c in range(len(counts))]))


def program(ctx: Context) -> Program:
    moments = Moments.from_sums((yield moment_requests(ctx)), ctx)
    gram, class_sums = moments.raw()
    return logme_from_moments(gram, class_sums, moments.counts)


SPEC = ScorerSpec(
    name="logme",
    program=program,
    rounds=1,
    needs_features=True,
    needs_source_probs=False,
    summary="log marginal evidence of a Bayesian linear model from features to one-hot labels",
    reference="thuml/LogME LogME.fit (fixed-point), raw features",
)
