"""Reference for the linear probe: a centralised fit on the pooled training rows.

Written from the definition, without fedmte: the held-back split (row i held back when the
first 8 bytes of sha256(b"fedmte.holdout.v1\\0" || seed || i), both int64 little-endian, read
big-endian, fall below holdout * 2^64), then the L2-regularised multinomial logistic
regression with an unpenalised intercept, sum_i CE_i + (l2/2) ||W[:-1]||^2, minimised by
scipy's L-BFGS-B from zero with an analytic gradient, intercepts centred to sum zero (the
objective is flat along a common intercept shift), and the argmax accuracy on the held-back
rows. Pooled row ids are the rows' indices, as ``fedmte.score``'s in-memory sites number them.
"""

from __future__ import annotations

import hashlib

import numpy as np
from scipy import optimize
from scipy.special import logsumexp


def held_back(row_ids: np.ndarray, seed: int, holdout: float) -> np.ndarray:
    out = np.zeros(len(row_ids), dtype=bool)
    for i, row in enumerate(np.asarray(row_ids).tolist()):
        data = b"fedmte.holdout.v1\x00" + int(seed).to_bytes(8, "little", signed=True) + int(row).to_bytes(8, "little", signed=True)
        out[i] = int(hashlib.sha256(data).hexdigest()[:16], 16) < int(holdout * 2.0**64)
    return out


def lbfgs_fit(features: np.ndarray, labels: np.ndarray, num_classes: int, l2: float = 1.0) -> np.ndarray:
    """The (d + 1, C) weights (last row: intercepts, summing to zero)."""
    n, d = features.shape
    # Fit on the rows moved by their mean, then move the intercepts back: an exact change of
    # coordinates (the penalty does not see the intercepts) that keeps L-BFGS well conditioned
    # when the features sit far from the origin.
    mean = features.mean(axis=0)
    lifted = np.hstack([features - mean, np.ones((n, 1))])
    one_hot = np.eye(num_classes)[labels]
    mask = np.ones((d + 1, num_classes))
    mask[-1] = 0.0

    def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
        w = flat.reshape(d + 1, num_classes)
        z = lifted @ w
        lse = logsumexp(z, axis=1)
        value = float(np.sum(lse - np.sum(z * one_hot, axis=1))) + 0.5 * l2 * float(np.sum((w * mask) ** 2))
        probs = np.exp(z - lse[:, None])
        grad = lifted.T @ (probs - one_hot) + l2 * w * mask
        return value, grad.ravel()

    result = optimize.minimize(objective, np.zeros((d + 1) * num_classes), jac=True, method="L-BFGS-B",
                               options={"maxiter": 20000, "maxfun": 40000, "gtol": 1e-12, "ftol": 0.0, "maxcor": 30})
    w = result.x.reshape(d + 1, num_classes)
    w[-1] -= mean @ w[:-1]
    w[-1] -= w[-1].mean()
    return w


def probe(features: np.ndarray, labels: np.ndarray, row_ids: np.ndarray, num_classes: int, *, l2: float = 1.0,
          seed: int = 0, holdout: float = 0.2) -> tuple[np.ndarray, int, int]:
    """(weights, correct held-back predictions, held-back rows)."""
    back = held_back(row_ids, seed, holdout)
    w = lbfgs_fit(features[~back], labels[~back], num_classes, l2)
    z = features[back] @ w[:-1] + w[-1]
    return w, int(np.sum(np.argmax(z, axis=1) == labels[back])), int(back.sum())


def linear_probe(features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray | None = None, **options) -> float:
    _, correct, rows = probe(features, labels, np.arange(len(labels)), int(labels.max()) + 1, **options)
    return correct / rows


def lda_head(features: np.ndarray, labels: np.ndarray, num_classes: int, shrinkage: float = 0.1) -> np.ndarray:
    """The (d + 1, C) shrunk-LDA head on the given rows, straight from its definition: class
    means, the within-class covariance over n, shrunk toward its mean eigenvalue."""
    n, d = features.shape
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    means = np.stack([features[labels == c].mean(axis=0) for c in range(num_classes)])
    centred = features - means[labels]
    within = centred.T @ centred / n
    cov = (1 - shrinkage) * within + shrinkage * np.trace(within) / d * np.eye(d)
    w = np.linalg.solve(cov, means.T)
    bias = -0.5 * np.sum(means.T * w, axis=0) + np.log(counts / n)
    return np.vstack([w, bias])


def lda_probe(features: np.ndarray, labels: np.ndarray, source_probs: np.ndarray | None = None, *,
              shrinkage: float = 0.1, seed: int = 0, holdout: float = 0.2) -> float:
    back = held_back(np.arange(len(labels)), seed, holdout)
    w = lda_head(features[~back], labels[~back], int(labels.max()) + 1, shrinkage)
    z = features[back] @ w[:-1] + w[-1]
    return float(np.mean(np.argmax(z, axis=1) == labels[back]))


REFERENCES = {"linear_probe": linear_probe, "lda_probe": lda_probe}

TOLERANCES: dict[tuple[str, str], tuple[float, str]] = {}
