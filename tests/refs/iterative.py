"""References for the opt-in iterative scorers: nleep, pactran_dir, pactran_gamma.

nleep: scikit-learn's own PCA and GaussianMixture on the pooled rows, in float64, started
from fedmte's agreed initialisation (the only part not in the reference, which seeds with
k-means; see ``fedmte.protocol.scorers.nleep``), then LEEP as google-research's
``leep.get_leep_score`` computes it (divide-no-nan, -log C where eep = 0).
pactran_*: a row-level transcription of google-research/pactran_metrics
``calculate_pac_dir`` and ``calculate_pac_gamma``.
"""

from __future__ import annotations

import numpy as np
from scipy.special import digamma, gammaln, logsumexp
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits


def agreed_initialisation(variances: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights, means and precisions of fedmte's documented starting mixture, from the PCA
    variances: means sqrt(v) * N(0, I) draws of numpy's generator seeded 123, covariances
    diag(v) K^(-2/k), equal weights."""
    k = len(variances)
    means = np.random.default_rng(123).standard_normal((components, k)) * np.sqrt(variances)
    precision = np.diag(1.0 / (variances * components ** (-2.0 / k)))
    return np.full(components, 1.0 / components), means, np.repeat(precision[None], components, axis=0)


def google_leep(probs: np.ndarray, labels: np.ndarray) -> float:
    """google-research ``get_leep_score``, in float64."""
    num_classes = int(labels.max()) + 1
    one_hot = np.eye(num_classes)[labels]
    occurrences = probs.T @ one_hot  # (S, C)
    mass = occurrences.sum(axis=1, keepdims=True)
    p_t_given_s = np.divide(occurrences, mass, out=np.zeros_like(occurrences), where=mass != 0)
    eep = np.sum((probs @ p_t_given_s) * one_hot, axis=1)
    safe = np.where(eep > 0, eep, 1.0)
    return float(np.mean(np.where(eep > 0, np.log(safe), -np.log(float(num_classes)))))


def nleep_mixture(
    features: np.ndarray, labels: np.ndarray, max_iter: int = 100
) -> tuple[GaussianMixture, np.ndarray]:
    """The fitted mixture and the PCA features it was fitted on.

    BLAS runs single-threaded: scikit-learn inverts one small triangular factor per component
    and iteration, and threaded OpenBLAS turns each of those into milliseconds of spinning on a
    busy machine. The numbers do not depend on it beyond rounding.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_mixture(features, labels, max_iter)


def _fit_mixture(features: np.ndarray, labels: np.ndarray, max_iter: int) -> tuple[GaussianMixture, np.ndarray]:
    pca = PCA(n_components=0.8, svd_solver="full")
    reduced = pca.fit_transform(features.astype(np.float64))
    components = 5 * (int(labels.max()) + 1)
    weights, means, precisions = agreed_initialisation(pca.explained_variance_, components)
    mixture = GaussianMixture(
        n_components=components,
        covariance_type="full",
        reg_covar=1e-6,
        tol=1e-3,
        max_iter=max_iter,
        weights_init=weights,
        means_init=means,
        precisions_init=precisions,
    ).fit(reduced)
    return mixture, reduced


def nleep(features, labels, source_probs=None):
    mixture, reduced = nleep_mixture(features, labels)
    return google_leep(mixture.predict_proba(reduced), labels)


def _one_hot(labels):
    out = np.zeros((labels.size, labels.max() + 1))
    out[np.arange(labels.size), labels] = 1.0
    return out


def pactran_dir(features, labels, source_probs, alpha=1.0):
    """``calculate_pac_dir``: 10 mean-field passes, then the closed-form bound."""
    y = _one_hot(labels)  # (n, C)
    a0 = alpha * y.sum(axis=0)[:, None] / y.sum() + 1e-10  # (C, 1)
    q = source_probs
    log_s = np.log(source_probs + 1e-10)
    for _ in range(10):
        aw = a0 + np.einsum("iy,iz->yz", y, q)
        logits = log_s + y @ digamma(aw) - digamma(aw.sum(axis=0))[None, :]
        log_q = logits - logsumexp(logits, axis=-1, keepdims=True)
        q = np.exp(log_q)
    log_c0 = gammaln(a0.sum()) - gammaln(a0).sum()
    log_c = gammaln(aw.sum(axis=0)) - gammaln(aw).sum(axis=0)
    value = np.sum(log_c0 - log_c - np.sum(q * (log_q - log_s), axis=0))
    return float(-value / y.size)


def pactran_gamma(features, labels, source_probs, alpha=1.0):
    """``calculate_pac_gamma`` (beta = 1)."""
    y = _one_hot(labels)
    a0 = alpha * y.sum(axis=0)[:, None] / y.sum() + 1e-10
    beta = 1.0
    q = source_probs
    s = source_probs
    log_s = np.log(source_probs + 1e-10)
    for _ in range(10):
        aw = a0 + np.einsum("iy,iz->yz", y, q)
        lw = s @ (aw / beta).sum(axis=0)[:, None]  # (n, 1)
        logits = log_s + y @ (digamma(aw) - np.log(beta))
        log_q = logits - logsumexp(logits, axis=-1, keepdims=True)
        q = np.exp(log_q)
    value = np.sum(gammaln(a0) - gammaln(aw) + aw * np.log(beta) - a0 * np.log(beta)) + np.sum(
        np.sum(q * (log_q - log_s), axis=-1) + np.log(lw[:, 0]) - 1.0
    )
    return float(value / y.size + 1.0)


REFERENCES = {
    "nleep": nleep,
    "pactran_dir": pactran_dir,
    "pactran_gamma": pactran_gamma,
}

TOLERANCES: dict[tuple[str, str], tuple[float, str]] = {}
