"""H-score and its shrinkage variant: how much of the feature variance is class signal.

``hscore`` follows tllib ``h_score`` (= Bao et al.'s ``getHscore``):
``tr(pinv(cov f) cov g)`` with ``g_i`` the mean of sample i's class, both covariances at
1/(n-1). ``shrinkage_hscore`` follows tllib ``regularized_h_score`` (Ibrahim et al.):
the feature covariance replaced by scikit-learn's Ledoit-Wolf estimate.

Ranges. cov f = cov_w + cov g with both PSD, so cov g <= cov f and the eigenvalues of
cov_f^{+/2} cov_g cov_f^{+/2} lie in [0, 1] (range(cov g) is inside range(cov f)): H-score lies in
[0, rank(cov g)] and rank(cov g) <= min(C - 1, d) (C class means about their weighted mean).
The shrinkage variant is >= 0 (the shrinkage lies in [0, 1]: beta <= delta, both >= 0); its
upper end is n/(n-1) min(C - 1, d) (covariance at 1/n, class signal at 1/(n-1)), which needs
n, so only the lower end is declared.

References: Bao et al., "An Information-Theoretic Approach to Transferability in Task
Transfer Learning", ICIP 2019; Ibrahim et al., "Newer is not always better: Rethinking
transferability metrics, their peculiarities, stability and performance", ECML-PKDD 2022.
"""

from __future__ import annotations

import numpy as np

from fedmte.protocol.requests import Stat
from fedmte.protocol.scorers.base import Bounds, Context, Program, ScorerSpec, require_classes
from fedmte.protocol.scorers.moments import Moments, moment_requests

RCOND = 1e-15  # the reference's pinv cutoff


def symmetric_pinv(matrix: np.ndarray) -> np.ndarray:
    """Pseudo-inverse of a symmetric PSD matrix.

    Eigenvalues below ``max(1e-15, d * eps)`` times the largest are dropped. For full-rank
    covariances this is the reference's ``pinv(rcond=1e-15)``; when d >= n - 1 the
    covariance is singular and the reference's value depends on rounding noise in its null
    space, so fedmte drops that noise and returns the exact-arithmetic value (C - 1 for
    H-score).
    """
    eigvals, eigvecs = np.linalg.eigh(matrix)
    cutoff = max(RCOND, matrix.shape[0] * np.finfo(np.float64).eps) * np.max(np.abs(eigvals))
    keep = eigvals > cutoff
    return (eigvecs[:, keep] / eigvals[keep]) @ eigvecs[:, keep].T


def hscore_bounds(ctx: Context) -> Bounds:
    """[0, min(C - 1, d)]: see the module docstring."""
    return (0.0, float(min(ctx.num_classes - 1, ctx.dim)))


def hscore_program(ctx: Context) -> Program:
    m = Moments.from_sums((yield moment_requests(ctx)), ctx)
    require_classes(m.counts, "hscore")
    cov_f = m.scatter / (m.n - 1)
    cov_g = m.between_scatter / (m.n - 1)
    return float(np.sum(symmetric_pinv(cov_f) * cov_g))


def ledoit_wolf(m: Moments, norm4: float, norm2_weighted: np.ndarray) -> tuple[np.ndarray, float]:
    """scikit-learn's Ledoit-Wolf covariance and shrinkage of the centred features.

    Needs sum ||x||^4 and sum ||x||^2 x (offset coordinates) to expand
    beta_ = sum ||x_i - mu||^4 without a second round.
    """
    n, d, mu = m.n, m.dim, m.mean
    emp_cov = m.scatter / n
    trace = np.trace(emp_cov)
    shrink_target = trace / d
    a_sum = np.trace(m.gram)
    c = mu @ mu
    beta_sum = (
        norm4
        + 4.0 * mu @ m.gram @ mu
        + n * c * c
        - 4.0 * mu @ norm2_weighted
        + 2.0 * c * a_sum
        - 4.0 * c * (mu @ m.class_sums.sum(axis=0))
    )
    delta_sum = np.sum(emp_cov**2)
    beta = (beta_sum / n - delta_sum) / (d * n)
    delta = (delta_sum - 2.0 * shrink_target * trace + d * shrink_target**2) / d
    beta = min(beta, delta)
    shrinkage = 0.0 if beta == 0 else beta / delta
    covariance = (1.0 - shrinkage) * emp_cov
    covariance.flat[:: d + 1] += shrinkage * shrink_target
    return covariance, float(shrinkage)


def shrinkage_hscore_program(ctx: Context) -> Program:
    requests = moment_requests(ctx)
    requests["norm4"] = Stat.of("norm4_sum", ctx.centred_view)
    requests["norm2_weighted"] = Stat.of("norm2_weighted_sum", ctx.centred_view)
    sums = yield requests
    m = Moments.from_sums(sums, ctx)
    require_classes(m.counts, "shrinkage_hscore")
    covariance, shrinkage = ledoit_wolf(m, float(sums["norm4"]), sums["norm2_weighted"])
    cov_g = m.between_scatter / (m.n - 1)
    return float(np.sum(symmetric_pinv(covariance) * ((1.0 - shrinkage) * cov_g)))


HSCORE = ScorerSpec(
    name="hscore",
    program=hscore_program,
    rounds=1,
    needs_features=True,
    needs_source_probs=False,
    centred=True,
    summary="tr(cov(f)^+ cov(E[f|y])): class signal relative to feature variance",
    reference="tllib ranking.hscore.h_score (Bao et al. 2019)",
    bounds=hscore_bounds,
)

SHRINKAGE_HSCORE = ScorerSpec(
    name="shrinkage_hscore",
    program=shrinkage_hscore_program,
    rounds=1,
    needs_features=True,
    needs_source_probs=False,
    centred=True,
    summary="H-score with a Ledoit-Wolf shrunk feature covariance, stable when d is large",
    reference="tllib ranking.hscore.regularized_h_score (Ibrahim et al. 2022)",
    bounds=lambda ctx: (0.0, None),
)
