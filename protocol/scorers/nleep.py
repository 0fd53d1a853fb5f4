"""N-LEEP: LEEP with a Gaussian mixture fitted to the features in place of the source head.

Follows google-research ``stable_transfer/transferability/nleep.py`` (``get_nleep_score``)
with the pipeline's settings: PCA keeping the fewest components whose cumulative explained
variance exceeds 0.8 (scikit-learn ``PCA(n_components=0.8, svd_solver='full')``), then
``GaussianMixture(n_components=5C, covariance_type='full', reg_covar=1e-6, tol=1e-3,
max_iter=100)``, then LEEP (``leep.get_leep_score``) on the mixture's posteriors.

Federation (rounds after the plan's centring round, which fixes the offset o):

1. n, sum x and X^T X of x = f - o. The server takes the PCA by ``eigh`` of the scatter and
   broadcasts the mean and the (d, k) basis; sites use the view z = (f - o - mean) B.
2. Up to 100 EM rounds. Sites compute the responsibilities r under the broadcast mixture
   and return, per component j, sum r, sum r (z - m_j), sum r (z - m_j)(z - m_j)^T (upper
   triangle) and the sum of log p(z) (``gmm_moments``, ``gmm_loglik``). The moments are
   taken about the broadcast means m_j, which keeps digits when a component is narrow
   and far from the origin. The server does scikit-learn's M-step on the sums (weights
   n_k = sum r + 10 eps normalised, means, covariances + reg_covar on the diagonal) and
   stops when the mean log-likelihood changes by less than tol, as scikit-learn does.
3. LEEP on the posteriors of the final mixture: the soft joint Y^T r (C x K), then the sum
   of log sum_z P(y_i | z) r_iz for the broadcast P(y | z).

So ``rounds`` = 1 + 100 + 2 = 103 at most; a typical fit stops after 5 to 40 EM rounds.

Initialisation (fedmte's, documented deviation). The reference seeds the mixture with
k-means, which picks individual rows and so cannot be reproduced from sums. fedmte starts
EM from a rule on pooled moments that needs no extra round and no label: the moment-matched
analogue of scikit-learn's ``init_params='random_from_data'``. With v the PCA variances
(``explained_variance_``, ddof 1) and K = 5C:

* means m_j = sqrt(v) * g_j, with g = ``numpy.random.default_rng(123).standard_normal((K, k))``
  (123 is the reference's ``random_state``): draws from the Gaussian with the pooled mean
  and covariance;
* covariances diag(v) K^(-2/k): each component starts with 1/K of the data's volume;
* weights 1/K.

The server alone draws g, so sites never need the same numpy. Labels are deliberately not
used: a class-seeded mixture would leak the labels into the clustering and inflate the score.

Precision (documented deviation). The reference casts the PCA features to float32 and runs
LEEP in float32; fedmte stays in float64 end to end. LEEP's "-log C when eep = 0" branch
never fires here: a row's own responsibility makes eep >= max_z r_iz^2 / n > 0.

Range: LEEP's, [-log C, 0] (:mod:`fedmte.protocol.scorers.source_label`; the mixture's
posteriors play the source head's probabilities).

Reference: Li et al., "Ranking Neural Checkpoints", CVPR 2021.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from fedmte.protocol import symmetric
from fedmte.protocol.errors import ScorerDomainError
from fedmte.protocol.requests import Stat, Transform
from fedmte.protocol.scorers.base import Context, Program, ScorerSpec, Sums, neg_entropy_bounds
from fedmte.protocol.scorers.source_label import leep_conditional

VARIANCE_KEPT = 0.8  # PCA(n_components=0.8) in the google-research pipeline
COMPONENTS_PER_CLASS = 5  # K = 5C, as in the paper and get_train_nleep
REG_COVAR = 1e-6  # GaussianMixture defaults from here down
TOLERANCE = 1e-3
MAX_ITER = 100
WEIGHT_FLOOR = 10 * np.finfo(np.float64).eps  # scikit-learn adds it to sum r
INIT_SEED = 123  # get_nleep_score's random_state, reused for fedmte's initial means
ROUNDS = 1 + MAX_ITER + 2


@dataclass(frozen=True)
class Pca:
    """The pooled PCA: mean (d,) and basis (d, k) in offset coordinates, variances (k,)."""

    mean: np.ndarray
    basis: np.ndarray
    variances: np.ndarray


@dataclass(frozen=True)
class Mixture:
    """A full-covariance Gaussian mixture: weights (K,), means (K, k), covariances (K, k, k)
    and the upper-triangular precision factors U (K, k, k), U U^T = covariance^-1."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    prec_chol: np.ndarray

    def broadcast(self) -> dict[str, np.ndarray]:
        """What the sites need to compute responsibilities (catalogue ``gmm_*`` arguments)."""
        return {"means": self.means, "prec_chol": self.prec_chol, "log_weights": np.log(self.weights)}


def pca_from_moments(n: int, total: np.ndarray, gram: np.ndarray) -> Pca:
    """PCA of the pooled rows from n, sum x (d,) and X^T X (d, d).

    Components are the eigenvectors of the scatter X^T X - n mean mean^T, largest first,
    each signed so that its largest-magnitude entry is positive (scikit-learn's
    ``svd_flip``). k is the smallest count whose cumulative variance ratio exceeds 0.8.
    """
    mean = total / n
    scatter = gram - n * np.outer(mean, mean)
    eigvals, eigvecs = np.linalg.eigh(scatter)
    eigvals, eigvecs = np.clip(eigvals[::-1], 0.0, None), eigvecs[:, ::-1]
    if not eigvals.sum() > 0:
        raise ScorerDomainError("nleep needs features that vary; every pooled feature row is the same")
    cumulative = np.cumsum(eigvals / eigvals.sum())
    k = min(int(np.searchsorted(cumulative, VARIANCE_KEPT, side="right")) + 1, len(eigvals))
    basis = eigvecs[:, :k]
    largest = np.argmax(np.abs(basis), axis=0)
    basis = basis * np.sign(basis[largest, np.arange(k)])
    return Pca(mean=mean, basis=basis, variances=eigvals[:k] / (n - 1))


def precision_cholesky(covariances: np.ndarray) -> np.ndarray:
    """U with U U^T = covariance^-1, upper triangular (scikit-learn's ``precisions_cholesky_``):
    U = L^-T for the Cholesky factor L of each covariance, all components in one batched call."""
    try:
        lower = np.linalg.cholesky(covariances)
    except np.linalg.LinAlgError:
        failed = next(j for j, c in enumerate(covariances) if np.any(np.linalg.eigvalsh(c) <= 0))
        raise ScorerDomainError(
            f"nleep's Gaussian mixture has an ill-defined covariance in component {failed} (a component "
            "collapsed onto too few rows); the reference scikit-learn fit fails the same way. Use "
            "more rows per class or fewer classes"
        ) from None
    identity = np.broadcast_to(np.eye(covariances.shape[-1]), covariances.shape)
    return np.triu(np.swapaxes(np.linalg.solve(lower, identity), 1, 2))


def initial_mixture(variances: np.ndarray, components: int) -> Mixture:
    """fedmte's agreed starting point (see the module docstring): seeded moment-matched draws."""
    k = len(variances)
    draws = np.random.default_rng(INIT_SEED).standard_normal((components, k))
    means = draws * np.sqrt(variances)
    covariances = np.zeros((components, k, k))
    covariances[:, np.arange(k), np.arange(k)] = variances * float(components) ** (-2.0 / k)
    return Mixture(
        weights=np.full(components, 1.0 / components),
        means=means,
        covariances=covariances,
        prec_chol=precision_cholesky(covariances),
    )


def m_step(previous_means: np.ndarray, moments: np.ndarray) -> Mixture:
    """scikit-learn's M-step from the summed ``gmm_moments`` (K, 1 + k + k(k+1)/2).

    With s0 = sum r, d1 = sum r (z - m), d2 = sum r (z - m)(z - m)^T about the broadcast means
    m: n_k = s0 + 10 eps, mean = (s0 m + d1) / n_k (= sum r z / n_k), and with delta = mean - m,
    covariance = (d2 - d1 delta^T - delta d1^T + s0 delta delta^T) / n_k + reg I
    (= sum r (z - mean)(z - mean)^T / n_k + reg I); weights = n_k / sum n_k.
    """
    components, k = previous_means.shape
    s0 = moments[:, 0]
    d1 = moments[:, 1 : 1 + k]
    d2 = symmetric.unpack(moments[:, 1 + k :])
    nk = s0 + WEIGHT_FLOOR
    means = (s0[:, None] * previous_means + d1) / nk[:, None]
    delta = means - previous_means
    cross = d1[:, :, None] * delta[:, None, :]
    scatter = d2 - cross - np.swapaxes(cross, 1, 2) + s0[:, None, None] * delta[:, :, None] * delta[:, None, :]
    covariances = scatter / nk[:, None, None]
    covariances[:, np.arange(k), np.arange(k)] += REG_COVAR
    return Mixture(
        weights=nk / nk.sum(),
        means=means,
        covariances=covariances,
        prec_chol=precision_cholesky(covariances),
    )


def program(ctx: Context) -> Program:
    view = ctx.centred_view
    sums: Sums = yield {"n": Stat.of("count"), "sum": Stat.of("sum", view), "gram": Stat.of("gram", view)}
    n = int(sums["n"])
    components = COMPONENTS_PER_CLASS * ctx.num_classes
    if n < components:
        raise ScorerDomainError(
            f"nleep fits {COMPONENTS_PER_CLASS} Gaussians per class ({components} for {ctx.num_classes} "
            f"classes) and needs at least that many rows; the pooled data have {n} (the reference "
            "scikit-learn fit refuses this too)"
        )
    pca = pca_from_moments(n, sums["sum"], symmetric.unpack(sums["gram"]))
    view = (*view, Transform.of("offset", offset=pca.mean), Transform.of("project", basis=pca.basis))

    mixture = initial_mixture(pca.variances, components)
    lower_bound = -np.inf
    converged = False
    for _ in range(MAX_ITER):
        params = mixture.broadcast()
        sums = yield {
            "moments": Stat.of("gmm_moments", view, **params),
            "loglik": Stat.of("gmm_loglik", view, **params),
        }
        previous, lower_bound = lower_bound, float(sums["loglik"]) / n
        mixture = m_step(mixture.means, sums["moments"])
        if abs(lower_bound - previous) < TOLERANCE:
            converged = True
            break
    if not converged:
        warnings.warn(
            f"nleep's EM did not converge in {MAX_ITER} rounds (as scikit-learn would warn); the score "
            "uses the last mixture, exactly as the reference does",
            UserWarning,
            stacklevel=2,
        )

    params = mixture.broadcast()
    sums = yield {"joint": Stat.of("gmm_soft_joint", view, **params)}
    conditional = leep_conditional(np.asarray(sums["joint"]))
    sums = yield {"loglik": Stat.of("gmm_mixture_loglik", view, conditional=conditional, **params)}
    return float(sums["loglik"]) / n


SPEC = ScorerSpec(
    name="nleep",
    program=program,
    rounds=ROUNDS,
    needs_features=True,
    needs_source_probs=False,
    centred=True,
    iterative=True,
    summary="LEEP of a 5C-component Gaussian mixture fitted (EM) to the PCA-reduced features",
    reference="google-research stable_transfer nleep.get_nleep_score (Li et al. 2021), fedmte's moment-based init",
    bounds=neg_entropy_bounds,
)
