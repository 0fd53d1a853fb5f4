"""SFDA: self-challenging Fisher discriminant analysis, in three rounds.

Follows TencentARC/SFDA ``metrics.py`` ``SFDA_Score`` (class ``SFDA``, ``utils.iterative_A``):

1. A regularised LDA on the features. Priors pi_c = n_c / n, class means mu_c and the
   within-class covariance S_w = sum_c pi_c Cov_c (biased), which the moments give as
   S_w = (F^T F - sum_c n_c mu_c mu_c^T) / n. The shrinkage is
   lambda = max(exp(-5 lambda_hat), 1e-10), with lambda_hat the top eigenvalue of S_w from
   three power-iteration double steps started at the row sums of S_w, and
   Shr(S) = (1 - lambda) S + lambda tr(S)/d I. The reference solves
   eigh(Shr(S_t) - Shr(S_w), Shr(S_w)) and sets coef = M V V^T; V is Shr(S_w)-orthonormal,
   so V V^T = Shr(S_w)^-1 and S_t only orders the columns of V: coef = M Shr(S_w)^-1,
   b_c = -1/2 mu_c . coef_c + log pi_c.
2. ConfMix (a site transform): p_i = softmax(softmax(x_i coef^T + b))[y_i] (the reference
   softens the posterior with a second softmax), x~_i = p_i x_i + (1 - p_i) mubar_{y_i},
   where mubar_c is the unweighted mean of the other classes' means. The sites send the
   moments of x~; a second LDA is fitted on them with the same lambda.
3. score = (1/n) sum_i p~(y_i | x~_i) under the second LDA (one softmax, no log).

Every step is invariant to a common translation of the features, so the moments are taken
on the centred view (``centred=True``). The reference overwrites its input array with the
ConfMix-ed features; here the sites transform a copy of each batch. The reference indexes
posterior columns by label value, so it is only defined when every class 0..C-1 has rows;
fedmte refuses a label space with an empty class (drop it) rather than guess.

When n - C < d and lambda sits at its 1e-10 floor, Shr(S_w) is ill-conditioned (cond
~1e11): directions outside the span of the within-class deviations get weights ~1e10, so
the posteriors of the rows come out one-hot in both LDAs and the score is 1, in the
reference and here alike (observed exactly); the conditioning does not reach the score.

Range: [0, 1], a mean posterior probability.

Reference: Shao et al., "Not All Models Are Equal: Predicting Model Transferability in a
Self-challenging Fisher Space", ECCV 2022.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmte.protocol.errors import ScorerDomainError
from fedmte.protocol.requests import Stat, Transform, View
from fedmte.protocol.scorers.base import (
    Context,
    Program,
    Requests,
    ScorerSpec,
    probability_bounds,
    require_all_classes,
)
from fedmte.protocol.scorers.moments import Moments, moment_requests

SHRINKAGE_RATE = 5.0  # lambda = exp(-5 lambda_hat)
SHRINKAGE_FLOOR = 1e-10
POWER_ITERATIONS = 3
CONFMIX_SOFTMAX_PASSES = 2  # the reference softens the first posterior with a second softmax


def _normalised(vector: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vector)
    if norm == 0.0:
        raise ScorerDomainError(
            "sfda's power iteration on the within-class covariance reached a zero vector (its "
            "row sums vanish, e.g. features that sum to a constant in every row); drop one "
            "redundant feature column"
        )
    return vector / norm


def top_eigenvalue(matrix: np.ndarray, iterations: int = POWER_ITERATIONS) -> float:
    """The reference's ``iterative_A``: from x = row sums, ``iterations`` times
    y = Ax/|Ax|, x = Ay/|Ay|; returns x^T A y."""
    x = matrix.sum(axis=1)
    y = x
    for _ in range(iterations):
        y = _normalised(matrix @ x)
        x = _normalised(matrix @ y)
    return float(x @ matrix @ y)


def adaptive_shrinkage(within_cov: np.ndarray) -> float:
    """lambda = max(exp(-5 lambda_hat), 1e-10) from the top eigenvalue of S_w."""
    return max(float(np.exp(-SHRINKAGE_RATE * top_eigenvalue(within_cov))), SHRINKAGE_FLOOR)


def shrunk(matrix: np.ndarray, shrinkage: float) -> np.ndarray:
    """(1 - lambda) S + lambda tr(S)/d I."""
    d = matrix.shape[0]
    out = (1.0 - shrinkage) * matrix
    out.flat[:: d + 1] += shrinkage * np.trace(matrix) / d
    return out


@dataclass(frozen=True)
class Discriminant:
    """A fitted SFDA discriminant: p(c | x) = softmax(x coef^T + bias)."""

    coef: np.ndarray  # (C, d)
    bias: np.ndarray  # (C,)
    shrinkage: float


def fit_discriminant(
    counts: np.ndarray, class_means: np.ndarray, within_cov: np.ndarray, shrinkage: float | None = None
) -> Discriminant:
    """The reference's ``SFDA.fit`` from priors, class means (C, d) and S_w (d, d).

    ``shrinkage=None`` picks lambda adaptively (first LDA); the second LDA passes the first
    one's lambda, as the reference does.
    """
    if shrinkage is None:
        shrinkage = adaptive_shrinkage(within_cov)
    priors = counts / counts.sum()
    # coef = M Shr(S_w)^-1, by the eigendecomposition of the symmetric PD matrix Shr(S_w)
    # (what the reference's V V^T amounts to).
    eigvals, eigvecs = np.linalg.eigh(shrunk(within_cov, shrinkage))
    if eigvals[0] <= 0.0:
        raise ScorerDomainError(
            "sfda's shrunk within-class covariance is not positive definite in float64 (the "
            "reference's eigh fails here too); the features are degenerate, e.g. constant columns"
        )
    coef = ((class_means @ eigvecs) / eigvals) @ eigvecs.T
    bias = -0.5 * np.einsum("cd,cd->c", class_means, coef) + np.log(priors)
    return Discriminant(coef=coef, bias=bias, shrinkage=shrinkage)


def others_means(class_means: np.ndarray) -> np.ndarray:
    """mubar_c = unweighted mean of the other classes' means, (C, d)."""
    return (class_means.sum(axis=0) - class_means) / (len(class_means) - 1)


def view_moment_requests(view: View) -> Requests:
    """Class sums and the Gram matrix of a feature view (counts do not change with it)."""
    return {"class_sums": Stat.of("class_sums", view), "gram": Stat.of("gram", view)}


def confmix_rounds(
    ctx: Context, view: View, counts: np.ndarray, class_means: np.ndarray, within_cov: np.ndarray
) -> Program:
    """SFDA's rounds 2 and 3, given round 1's moments of the rows seen through ``view``.

    PED calls this on the class-shifted view with the shifted class means.
    """
    n = int(counts.sum())
    first = fit_discriminant(counts, class_means, within_cov)
    mixed = view + (
        Transform.of(
            "confmix",
            coef=first.coef,
            bias=first.bias,
            others_mean=others_means(class_means),
            passes=CONFMIX_SOFTMAX_PASSES,
        ),
    )
    sums = yield view_moment_requests(mixed)
    m = Moments.from_sums({"n": n, "counts": counts, **sums}, ctx)
    second = fit_discriminant(counts, m.class_means, m.within_scatter / n, first.shrinkage)
    sums = yield {"hits": Stat.of("true_class_prob_sum", mixed, coef=second.coef, bias=second.bias)}
    return float(sums["hits"]) / n


def first_round_moments(sums: dict[str, np.ndarray], ctx: Context, scorer: str) -> Moments:
    """Round 1's moments; every class of the label space must have rows (see the module notes)."""
    m = Moments.from_sums(sums, ctx)
    require_all_classes(m.counts, scorer)
    return m


def program(ctx: Context) -> Program:
    m = first_round_moments((yield moment_requests(ctx)), ctx, "sfda")
    return (yield from confmix_rounds(ctx, ctx.centred_view, m.counts, m.class_means, m.within_scatter / m.n))


SPEC = ScorerSpec(
    name="sfda",
    program=program,
    rounds=3,
    needs_features=True,
    needs_source_probs=False,
    centred=True,
    summary="accuracy-like mean posterior of a shrunk LDA refitted on confidence-mixed features",
    reference="TencentARC/SFDA metrics.SFDA_Score (Shao et al. 2022)",
    bounds=probability_bounds,
)
