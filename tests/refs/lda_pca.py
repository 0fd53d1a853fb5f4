"""References for etran_lda, ncti (and its three terms) and gbc_pca.

Each function transcribes its reference on the pooled rows, in float64, with scikit-learn
where the reference uses it; none calls ``fedmte``. Two definitions the references leave
open are fixed here exactly as fedmte documents them:

* The PCA width is ``min(64, d, n - 1)``. The references ask for 64 components and raise
  when ``min(n, d) < 64``; ``n - 1`` is the rank of n centred rows, so a further component
  would be rounding noise (see ``test_lda_pca_scorers.py`` for why NCTI cannot take it).
* Labels are compacted with ``np.unique`` before indexing probabilities. The references
  index ``prob[arange(n), y]`` with the raw labels, which is the same thing when every class
  0..C-1 has rows, and an index error otherwise.
"""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from tests.refs.core import gbc as gbc_no_pca

PCA_COMPONENTS = 64


def pca_width(n: int, d: int) -> int:
    return min(PCA_COMPONENTS, d, n - 1)


def _softmax(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    z = np.exp(z)
    return z / z.sum(axis=1, keepdims=True)


def _shrunk(cov, shrinkage):
    d = cov.shape[0]
    out = (1.0 - shrinkage) * cov
    out.flat[:: d + 1] += shrinkage * np.trace(cov) / d
    return out


def _top_eigenvalue(a, iterations=3):
    # ETran's ``LDA.iterative_A``: power iteration from the row sums, Rayleigh-like quotient.
    x = a.sum(axis=1)
    for _ in range(iterations):
        t = a @ x
        y = t / np.linalg.norm(t)
        t = a @ y
        x = t / np.linalg.norm(t)
    return x @ a @ y


def etran_lda(features, labels, source_probs=None):
    """mgholamikn/ETran ``LDA_Score``: mean p(y_i | x_i) under ETran's ``LDA`` class."""
    x = np.asarray(features, dtype=np.float64)
    n = len(labels)
    classes, y = np.unique(labels, return_inverse=True)
    priors = np.bincount(y) / n
    means = np.stack([x[y == c].mean(axis=0) for c in range(len(classes))])
    sw = sum(priors[c] * np.atleast_2d(np.cov(x[y == c].T, bias=True)) for c in range(len(classes)))
    shrinkage = max(np.exp(-5.0 * _top_eigenvalue(sw)), 1e-10)
    st = _shrunk(np.cov(x.T, bias=True), shrinkage)
    sw_shrunk = _shrunk(sw, shrinkage)
    # np.linalg.eigh reads the lower triangle of this non-symmetric matrix, as the reference does.
    evals, evecs = np.linalg.eigh(np.linalg.inv(sw_shrunk) @ (st - sw_shrunk))
    evecs = evecs[:, np.argsort(evals)[::-1]]
    coef = means @ evecs @ evecs.T
    intercept = -0.5 * np.diag(means @ coef.T) + np.log(priors)
    prob = _softmax(x @ coef.T + intercept)
    return float(prob[np.arange(n), y].sum() / n)


def ncti_terms(features, labels, width=None):
    """BUserName/NCTI ``NCTI_Score``: (seli, ncc, vc) of one model; ``width`` overrides k."""
    x = np.asarray(features, dtype=np.float64)
    n, d = x.shape
    classes, y = np.unique(labels, return_inverse=True)
    pca = PCA(n_components=pca_width(n, d) if width is None else width)
    z = pca.fit_transform(x, y)
    shrinkage = max(np.exp(-pca.explained_variance_[:32].sum()), 1e-10)
    if shrinkage == 1e-10:
        lda = LinearDiscriminantAnalysis(solver="svd")
    else:
        lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage=float(shrinkage))
    low = lda.fit_transform(z, y)
    low = low - low.mean(axis=0, keepdims=True)
    seli = np.linalg.norm(low, ord="nuc")
    prob = lda.predict_proba(z)
    ncc = prob[np.arange(n), y].sum() / n
    vc = np.log(sum(np.linalg.norm(prob[y == c], ord="nuc") for c in range(len(classes))))
    return float(seli), float(ncc), float(vc)


def ncti(features, labels, source_probs=None):
    seli, ncc, vc = ncti_terms(features, labels)
    return seli + ncc - vc


def ncti_seli(features, labels, source_probs=None):
    return ncti_terms(features, labels)[0]


def ncti_ncc(features, labels, source_probs=None):
    return ncti_terms(features, labels)[1]


def ncti_vc(features, labels, source_probs=None):
    return ncti_terms(features, labels)[2]


def gbc_pca(features, labels, source_probs=None, gaussian_type="spherical"):
    """google-research GBC after ``pca_reduction(features, 64)`` (svd_solver 'full'), in float64."""
    x = np.asarray(features, dtype=np.float64)
    n, d = x.shape
    z = PCA(n_components=pca_width(n, d), svd_solver="full").fit_transform(x)
    return gbc_no_pca(z, labels, gaussian_type=gaussian_type)


REFERENCES = {
    "etran_lda": etran_lda,
    "ncti": ncti,
    "ncti_seli": ncti_seli,
    "ncti_ncc": ncti_ncc,
    "ncti_vc": ncti_vc,
    "gbc_pca": gbc_pca,
}

TOLERANCES: dict[tuple[str, str], tuple[float, str]] = {}
