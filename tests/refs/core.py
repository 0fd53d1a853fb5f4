"""References for logme, hscore, shrinkage_hscore, nce, leep, gbc, transrate, linear_mse."""

from __future__ import annotations

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.linear_model import Ridge


def logme(features, labels, source_probs=None):
    """thuml/LogME ``_fit_fixed_point``: SVD of the raw features, 11 fixed-point passes."""
    f = features.astype(np.float64)
    n, d = f.shape
    if n > d:
        eigvals, vh = np.linalg.svd(f.T @ f)[1:]
        s = np.sqrt(eigvals)
        k = int(np.sum(s > 1e-10))
        s, vh = s[:k], vh[:k]
        u = (f @ vh.T) / s
    else:
        u, s, vh = np.linalg.svd(f, full_matrices=False)
    sigma = s**2
    evidences = []
    for c in range(int(labels.max()) + 1):
        y = (labels == c).astype(np.float64)
        x = u.T @ y
        x2 = x**2
        res_x2 = (y**2).sum() - x2.sum()
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = (sigma / (sigma + t)).sum()
            m2 = (sigma * x2 / ((t + sigma) ** 2)).sum()
            res2 = (x2 / ((1 + sigma / t) ** 2)).sum() + res_x2
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * sigma))
                    - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def _class_mean_rows(f, labels):
    g = np.zeros_like(f)
    for c in np.unique(labels):
        g[labels == c] = f[labels == c].mean(axis=0)
    return g


def _pinv(matrix):
    # The reference's pinv(rcond=1e-15), with fedmte's documented guard against null-space
    # rounding noise when d >= n - 1 (relative cutoff d * eps).
    return np.linalg.pinv(matrix, rcond=max(1e-15, matrix.shape[0] * np.finfo(float).eps), hermitian=True)


def hscore(features, labels, source_probs=None):
    """tllib ``h_score``: tr(pinv(cov f) cov g)."""
    f = features.astype(np.float64)
    cov_f = np.cov(f, rowvar=False)
    cov_g = np.cov(_class_mean_rows(f, labels), rowvar=False)
    return float(np.trace(_pinv(cov_f) @ cov_g))


def shrinkage_hscore(features, labels, source_probs=None):
    """tllib ``regularized_h_score``: Ledoit-Wolf covariance of the centred features."""
    f = features.astype(np.float64)
    f = f - f.mean(axis=0, keepdims=True)
    lw = LedoitWolf(assume_centered=False).fit(f)
    cov_g = np.cov(_class_mean_rows(f, labels), rowvar=False)
    return float(np.trace(_pinv(lw.covariance_) @ ((1 - lw.shrinkage_) * cov_g)))


def nce(features, labels, source_probs):
    """thuml/LogME ``NCE.py`` on argmax source labels."""
    z = np.argmax(source_probs, axis=1)
    n = len(z)
    joint = np.zeros((int(labels.max()) + 1, int(z.max()) + 1))
    for s, t in zip(z, labels):
        joint[t, s] += 1.0 / n
    p_z = joint.sum(axis=0, keepdims=True)
    mask = p_z.reshape(-1) != 0
    cond = (joint[:, mask] / p_z[:, mask]).T + 1e-20
    h = np.sum(-cond * np.log(cond), axis=1)
    return float(-np.sum(h * p_z.reshape(-1)[mask]))


def leep(features, labels, source_probs):
    """thuml/LogME ``LEEP.py``."""
    n, cs = source_probs.shape
    joint = np.zeros((int(labels.max()) + 1, cs))
    for c in range(joint.shape[0]):
        joint[c] = (source_probs[labels == c] / n).sum(axis=0)
    cond = (joint / joint.sum(axis=0, keepdims=True)).T
    pred = source_probs @ cond
    return float(np.mean(np.log(pred[np.arange(n), labels])))


def gbc(features, labels, source_probs=None, gaussian_type="spherical"):
    """google-research ``get_gbc_score`` (float64, no PCA)."""
    f = features.astype(np.float64)
    classes = np.unique(labels)
    stats = {}
    for c in classes:
        rows = f[labels == c]
        var = np.maximum(rows.var(axis=0), 1e-4)
        stats[c] = (rows.mean(axis=0), var.mean() if gaussian_type == "spherical" else var)
    total = 0.0
    for a in classes:
        for b in classes:
            if a == b:
                continue
            (mu1, s1), (mu2, s2) = stats[a], stats[b]
            avg = (s1 + s2) / 2
            first = np.sum((mu1 - mu2) ** 2 / avg) / 8
            second = np.sum(np.log(avg)) - 0.5 * np.sum(np.log(s1)) - 0.5 * np.sum(np.log(s2))
            total += np.exp(-(first + 0.5 * second))
    return float(-total)


def transrate(features, labels, source_probs=None, eps=1e-4):
    """tllib ``transrate`` (the paper's appendix code)."""

    def rate(z):
        n, d = z.shape
        return 0.5 * np.linalg.slogdet(np.eye(d) + z.T @ z / (n * eps))[1]

    z = features - features.mean(axis=0, keepdims=True)
    k = int(labels.max()) + 1
    return float(rate(z) - sum(rate(z[labels == c]) for c in range(k)) / k)


def linear_mse(features, labels, source_probs=None, alpha=1.0):
    """Negative training MSE of sklearn ``Ridge(alpha=1)`` on one-hot labels."""
    y = np.eye(int(labels.max()) + 1)[labels]
    model = Ridge(alpha=alpha, fit_intercept=True, solver="cholesky").fit(features, y)
    return float(-np.sum((y - model.predict(features)) ** 2) / len(labels))


REFERENCES = {
    "logme": logme,
    "hscore": hscore,
    "shrinkage_hscore": shrinkage_hscore,
    "nce": nce,
    "leep": leep,
    "gbc": gbc,
    "transrate": transrate,
    "linear_mse": linear_mse,
}

TOLERANCES: dict[tuple[str, str], tuple[float, str]] = {}
