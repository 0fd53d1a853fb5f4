"""NCTI: neural collapse transferability index, its three per-model terms and their mix.

Follows BUserName/NCTI ``metrics.py`` ``NCTI_Score`` (per model) and
``evaluate_metric_group1_cpu.py`` (across models), with scikit-learn 1.9.1:

1. PCA of the pooled features to k = min(64, d, n - 1) dimensions, z = (f - mean) B, with
   explained variances ev (1/(n - 1)). See :mod:`fedmte.protocol.scorers.gbc_pca`.
2. lambda = max(exp(-sum(ev[:32])), 1e-10). If lambda == 1e-10, sklearn's
   ``LinearDiscriminantAnalysis(solver='svd')``, otherwise ``solver='eigen'`` with
   ``shrinkage=lambda``, fitted on z.
3. seli = ||centred LDA transform of z||_* (the nuclear norm of an n x m matrix,
   m = min(C - 1, k)); ncc = (1/n) sum_i p(y_i | z_i) (the LDA's ``predict_proba``);
   vc = log sum_c ||P_c||_*, where P_c holds the probability rows of class c.
4. Across the candidate models: NCTI = minmax(ncc) + minmax(seli) - minmax(vc), each term
   min-max scaled over the models (:func:`combine`).

Both LDA solvers reduce to moments of z: class means, the within-class scatter W and the
total scatter S, all B^T (...) B of the pooled moments of f. The eigen solver takes the
generalised eigenvectors V of (Shr(S/n) - Shr(W/n), Shr(W/n)), where Shr is sklearn's
``shrunk_covariance`` (a per-class shrinkage summed with the priors equals Shr of the
summed covariance); coef = M V V^T. The svd solver is replayed step by step: per-feature
within-class scale s_j = sqrt(W_jj / n), the rank cut (singular values > 1e-4) on the
eigenvalues of the scaled W / n, the SVD of the scaled class centres with the cut
1e-4 times the largest, coef and intercept exactly as sklearn forms them. The transform
of the centred rows has Gram matrix V_m^T S V_m, whose singular values give seli.

Rounds: (1) n, class counts, class sums and F^T F, shared with the moment scorers; (2)
after the coordinator broadcasts the PCA view and the LDA (coef, intercept), the sum of
p(y_i | z_i) (for ncc) and, per class, sum_i p_i p_i^T = P_c^T P_c (for vc; C (C + 1)/2
floats per class, so C^2 (C + 1)/2 in all: 5e5 floats at C = 100). seli needs round 1
only, so ``ncti_seli`` alone takes one round.

Definitions and deviations:

* ``ncti`` (the registry's per-model value) is seli + ncc - vc, the reference's terms added
  without the cross-model scaling. Ranking models by it is *not* the paper's NCTI: seli
  is a nuclear norm that grows with n and dominates the sum. ``ncti_seli``, ``ncti_ncc``
  and ``ncti_vc`` report the terms; :func:`combine` turns the terms of all candidate
  models into the paper's score. :data:`NCTI` declares the terms as its helper scorers and
  :func:`combine_scores` as its cross-model step, so a job that asks for ``ncti`` runs them
  and the ranking ranks the paper's score.
* PCA width k = min(64, d, n - 1) where the reference asks for 64 and raises when
  min(n, d) < 64. With k = n the last component is rounding noise, and the svd solver's
  per-feature scaling blows it up to unit size, so the reference's value would depend on
  rounding.
* The PCA is the exact one. The reference's ``PCA(64)`` uses ``svd_solver='auto'``, which
  in sklearn 1.9.1 eigendecomposes the covariance when d <= 1000 and n >= 10 d (what fedmte
  does), runs the full SVD when max(n, d) <= 500, and otherwise a randomized SVD (when
  64 < 0.8 min(n, d)), which moments cannot reproduce; there the reference approximates
  what fedmte computes.
* The svd solver's within-class factor is 1/n in sklearn 1.9.1 (scikit-learn PR #33626);
  earlier releases used 1/(n - C), which rescales the logits and so changes ncc and vc.
* The branch on lambda == 1e-10 is a comparison of floats: when sum(ev[:32]) is within
  rounding of -log(1e-10) = 23.03, the two sides may pick different solvers.
* A class with no pooled rows is refused (the reference indexes classes 0..C-1).
* Nuclear norms come from Gram matrices (P_c^T P_c, V_m^T S V_m) by pivoted Cholesky and
  an SVD of the factor (:func:`nuclear_norm_from_gram`), not the reference's SVD of P_c:
  a singular value is resolved to roughly sqrt(eps) times the norm of the columns it
  involves, where the reference resolves eps times the largest one. On the 50-class test
  data vc agrees to 1e-15 relative; square roots of the eigenvalues of P_c^T P_c were 4e-9
  off.

Ranges: ``ncti_ncc`` is a mean probability, in [0, 1]; ``ncti_seli`` is a norm, >= 0;
``ncti_vc`` and the unscaled ``ncti`` declare none.

Reference: Wang et al., "How Far Pre-trained Models Are from Neural Collapse on the Target
Dataset Informs their Transferability", ICCV 2023.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from fedmte.protocol import symmetric
from fedmte.protocol.errors import InvalidInputError, ScorerDomainError
from fedmte.protocol.requests import Stat
from fedmte.protocol.scorers.base import (
    Bounds,
    Context,
    Program,
    Requests,
    ScorerSpec,
    Sums,
    probability_bounds,
    require_all_classes,
)
from fedmte.protocol.scorers.gbc_pca import Pca, pca_from_moments
from fedmte.protocol.scorers.moments import Moments, moment_requests

EXPLAINED_TOP = 32  # lambda = exp(-sum of the top 32 explained variances)
SHRINKAGE_FLOOR = 1e-10  # ... floored here; exactly this value selects the svd solver
LDA_TOL = 1e-4  # LinearDiscriminantAnalysis(tol=1e-4), the svd solver's rank cut
COLLAPSED = 1e3 * np.finfo(np.float64).eps  # within / total scatter below this is rounding


@dataclass(frozen=True)
class NctiTerms:
    """The three per-model terms the reference returns: (seli, ncc, vc)."""

    seli: float  # nuclear norm of the centred LDA transform (higher: more class structure)
    ncc: float  # mean LDA posterior of the true class
    vc: float  # log of the summed per-class nuclear norms of the posteriors (lower: collapsed)


@dataclass(frozen=True)
class Lda:
    """A fitted sklearn LDA in PCA coordinates: p(c | z) = softmax(z coef^T + intercept)."""

    coef: np.ndarray  # (C, k)
    intercept: np.ndarray  # (C,)
    scalings: np.ndarray  # (k, m): the transform's directions, m = min(C - 1, k) or fewer
    solver: str
    shrinkage: float


def adaptive_shrinkage(pca: Pca) -> float:
    """lambda = max(exp(-sum of the top 32 explained variances), 1e-10)."""
    return max(float(np.exp(-pca.variances[:EXPLAINED_TOP].sum())), SHRINKAGE_FLOOR)


def _shrunk(matrix: np.ndarray, shrinkage: float) -> np.ndarray:
    """sklearn ``shrunk_covariance``: (1 - lambda) S + lambda tr(S)/k I."""
    k = matrix.shape[0]
    out = (1.0 - shrinkage) * matrix
    out.flat[:: k + 1] += shrinkage * np.trace(matrix) / k
    return out


def fit_eigen(priors: np.ndarray, means: np.ndarray, within: np.ndarray, scatter: np.ndarray, n: int, shrinkage: float) -> Lda:
    """sklearn ``_solve_eigen`` from priors (C,), class means (C, k) and the within-class
    and total scatters (k, k) of z over n rows."""
    sw = _shrunk(within / n, shrinkage)
    st = _shrunk(scatter / n, shrinkage)
    evals, evecs = scipy.linalg.eigh(st - sw, sw)
    evecs = evecs[:, np.argsort(evals)[::-1]]
    coef = (means @ evecs) @ evecs.T
    intercept = -0.5 * np.einsum("ck,ck->c", means, coef) + np.log(priors)
    m = min(len(priors) - 1, means.shape[1])
    return Lda(coef=coef, intercept=intercept, scalings=evecs[:, :m], solver="eigen", shrinkage=shrinkage)


def fit_svd(priors: np.ndarray, means: np.ndarray, within: np.ndarray, n: int) -> Lda:
    """sklearn ``_solve_svd`` (1.9.1, within-class factor 1/n), replayed on moments."""
    c, k = means.shape
    std = np.sqrt(np.clip(np.diag(within) / n, 0.0, None))
    std[std == 0] = 1.0
    # Singular values S and right vectors V of X~ = sqrt(1/n) Xc / std, from X~^T X~.
    eigvals, eigvecs = np.linalg.eigh(within / n / np.outer(std, std))
    order = np.argsort(eigvals)[::-1]
    singular = np.sqrt(np.clip(eigvals[order], 0.0, None))
    rank = int(np.sum(singular > LDA_TOL))
    scalings = (eigvecs[:, order[:rank]] / std[:, None]) / singular[:rank]
    xbar = priors @ means
    centres = (np.sqrt(n * priors / (c - 1))[:, None] * (means - xbar)) @ scalings
    _, s2, vt2 = np.linalg.svd(centres, full_matrices=False)
    rank2 = int(np.sum(s2 > LDA_TOL * s2[0]))
    scalings = scalings @ vt2.T[:, :rank2]
    projected = (means - xbar) @ scalings
    coef = projected @ scalings.T
    intercept = -0.5 * np.sum(projected**2, axis=1) + np.log(priors) - xbar @ coef.T
    m = min(c - 1, k)
    return Lda(coef=coef, intercept=intercept, scalings=scalings[:, :m], solver="svd", shrinkage=SHRINKAGE_FLOOR)


@dataclass(frozen=True)
class PcaSpace:
    """Pooled moments of z = (x - mean) B: what both LDA solvers and seli need."""

    n: int
    priors: np.ndarray  # (C,)
    means: np.ndarray  # (C, k) class means of z
    within: np.ndarray  # (k, k) within-class scatter of z
    scatter: np.ndarray  # (k, k) total scatter of z (z has mean zero)

    @classmethod
    def of(cls, m: Moments, pca: Pca) -> PcaSpace:
        b = pca.basis
        return cls(
            n=m.n,
            priors=m.counts / m.n,
            means=(m.class_means - pca.mean) @ b,
            within=b.T @ m.within_scatter @ b,
            scatter=b.T @ m.scatter @ b,
        )


def fit_lda(space: PcaSpace, pca: Pca) -> Lda:
    """The reference's choice: the svd solver when lambda hits its floor, else eigen."""
    if np.trace(space.within) <= COLLAPSED * np.trace(space.scatter):
        raise ScorerDomainError(
            "ncti is undefined when the features are constant within every class (the "
            "within-class scatter is zero, so the LDA has nothing to whiten); sklearn fails "
            "on such features too"
        )
    shrinkage = adaptive_shrinkage(pca)
    if shrinkage == SHRINKAGE_FLOOR:
        return fit_svd(space.priors, space.means, space.within, space.n)
    return fit_eigen(space.priors, space.means, space.within, space.scatter, space.n, shrinkage)


def nuclear_norm_from_gram(gram: np.ndarray, rows: int) -> float:
    """||P||_* from G = P^T P (k, k), where P has ``rows`` rows.

    The square roots of G's eigenvalues would lose every singular value below about
    sqrt(eps) ||P|| (rounding noise of the largest eigenvalue swamps its square), and
    posteriors have many: a column of probabilities near 1e-6 gives singular values near
    1e-6 and below. Instead G = R^T R by Cholesky with diagonal pivoting (LAPACK
    ``dpstrf``), which keeps each column's digits relative to its own size, and the singular
    values of R (those of P) come from an SVD. Only the first min(rows, k) pivots count:
    P has at most that many non-zero singular values, and later pivots are rounding noise.
    """
    factor, _, rank, _ = scipy.linalg.lapack.dpstrf(gram, lower=0, tol=0.0)
    keep = min(rows, gram.shape[0], int(rank))
    if keep == 0:
        return 0.0
    return float(np.linalg.svd(np.triu(factor)[:keep], compute_uv=False).sum())


@dataclass(frozen=True)
class Fitted:
    """What the coordinator knows after round 1: the PCA, the moments of z and the LDA."""

    n: int
    counts: np.ndarray  # (C,)
    pca: Pca
    space: PcaSpace
    lda: Lda

    def seli(self) -> float:
        """||(Z - mean) V_m||_*, from its Gram matrix V_m^T S V_m (S the scatter of z)."""
        v = self.lda.scalings
        return nuclear_norm_from_gram(v.T @ self.space.scatter @ v, self.n)

    def hits_request(self) -> Stat:
        """Round 2: sum_i p(y_i | z_i)."""
        return Stat.of("true_class_prob_sum", self.pca.view, coef=self.lda.coef, bias=self.lda.intercept)

    def outer_request(self) -> Stat:
        """Round 2: per class, sum_i p_i p_i^T."""
        return Stat.of("class_prob_outer_sums", self.pca.view, coef=self.lda.coef, bias=self.lda.intercept)

    def ncc(self, hits: np.ndarray) -> float:
        return float(hits) / self.n

    def vc(self, outer: np.ndarray) -> float:
        """log sum_c ||P_c||_*, from the per-class sums of p p^T."""
        grams = symmetric.unpack(np.asarray(outer, dtype=np.float64))
        return float(np.log(sum(nuclear_norm_from_gram(g, int(rows)) for g, rows in zip(grams, self.counts))))


def fit_program(ctx: Context) -> Generator[Requests, Sums, Fitted]:
    """Round 1 (the moments), then the PCA and the LDA on the coordinator."""
    m = Moments.from_sums((yield moment_requests(ctx)), ctx)
    require_all_classes(m.counts, "ncti")
    pca = pca_from_moments(m)
    space = PcaSpace.of(m, pca)
    return Fitted(n=m.n, counts=m.counts, pca=pca, space=space, lda=fit_lda(space, pca))


def terms_program(ctx: Context) -> Generator[Requests, Sums, NctiTerms]:
    """Both rounds of NCTI for one model; returns its three terms."""
    fit = yield from fit_program(ctx)
    sums = yield {"hits": fit.hits_request(), "outer": fit.outer_request()}
    return NctiTerms(seli=fit.seli(), ncc=fit.ncc(sums["hits"]), vc=fit.vc(sums["outer"]))


def program(ctx: Context) -> Program:
    terms = yield from terms_program(ctx)
    return terms.seli + terms.ncc - terms.vc


# The term scorers ask only for what their term needs. Run together with ``ncti``, their
# requests are identical to its own (same content, same key), so nothing travels twice.
def seli_program(ctx: Context) -> Program:
    return (yield from fit_program(ctx)).seli()


def ncc_program(ctx: Context) -> Program:
    fit = yield from fit_program(ctx)
    return fit.ncc((yield {"hits": fit.hits_request()})["hits"])


def vc_program(ctx: Context) -> Program:
    fit = yield from fit_program(ctx)
    return fit.vc((yield {"outer": fit.outer_request()})["outer"])


def _minmax(values: np.ndarray) -> np.ndarray:
    spread = values.max() - values.min()
    if spread == 0:
        return np.zeros_like(values)
    return (values - values.min()) / spread


def combine(terms: Mapping[str, NctiTerms]) -> dict[str, float]:
    """The paper's NCTI of each candidate model from all models' terms.

    NCTI = minmax(ncc) + minmax(seli) - minmax(vc), each term scaled to [0, 1] over the
    models (``evaluate_metric_group1_cpu.py``). A term equal for every model (or a single
    model) gives 0 for all, where the reference divides by zero.
    """
    if not terms:
        raise InvalidInputError("combine needs the NCTI terms of at least one model")
    names = list(terms)

    def column(term: str) -> np.ndarray:
        return np.array([getattr(terms[name], term) for name in names], dtype=np.float64)

    scores = _minmax(column("ncc")) + _minmax(column("seli")) - _minmax(column("vc"))
    return {name: float(value) for name, value in zip(names, scores)}


TERMS = ("ncti_seli", "ncti_ncc", "ncti_vc")
"""The registry names of the three terms, the helper scorers :data:`NCTI` declares."""


def combine_scores(helpers: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """:func:`combine` on what the ranking holds, ``{model: {"ncti_seli": ..., ...}}``:
    NCTI's :attr:`ScorerSpec.combine` hook."""
    return combine({
        name: NctiTerms(**{term.removeprefix("ncti_"): float(row[term]) for term in TERMS})
        for name, row in helpers.items()
    })


def _spec(name: str, program_fn: Callable[[Context], Program], rounds: int, summary: str, *, opt_in: bool = True,
          helpers: tuple[str, ...] = (), cross_model: Callable[[Mapping[str, Mapping[str, float]]], dict[str, float]] | None = None,
          bounds: Callable[[Context], Bounds] | None = None) -> ScorerSpec:
    return ScorerSpec(
        bounds=bounds,
        helper_scorers=helpers,
        combine=cross_model,
        opt_in=opt_in,
        name=name,
        program=program_fn,
        rounds=rounds,
        needs_features=True,
        needs_source_probs=False,
        centred=True,
        summary=summary,
        reference="BUserName/NCTI metrics.NCTI_Score (Wang et al. 2023), sklearn 1.9.1, PCA width min(64, d, n - 1)",
    )


NCTI = _spec("ncti", program, 2, "NCTI's terms seli + ncc - vc of one model, unscaled (combine() gives the paper's cross-model mix)",
             opt_in=False, helpers=TERMS, cross_model=combine_scores)
NCTI_SELI = _spec("ncti_seli", seli_program, 1, "NCTI seli: nuclear norm of the centred LDA projection after PCA-64",
                  bounds=lambda ctx: (0.0, None))  # a norm
NCTI_NCC = _spec("ncti_ncc", ncc_program, 2, "NCTI ncc: mean LDA posterior of the true class after PCA-64",
                 bounds=probability_bounds)  # a mean probability
NCTI_VC = _spec("ncti_vc", vc_program, 2, "NCTI vc: log of the summed per-class nuclear norms of the LDA posteriors")
