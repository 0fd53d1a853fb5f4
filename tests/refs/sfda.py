"""References for sfda and ped: the formulas of the reference code, row by row.

``sfda`` transcribes TencentARC/SFDA ``metrics.py`` ``SFDA_Score`` (class ``SFDA`` and
``utils.iterative_A``); ``ped`` transcribes lixiaotong97/PED ``metrics.py`` ``PED_Score`` /
``One_Step_PED`` with the defaults of its ``evaluate_metric_cpu.py`` (time step 0.1, exit
ratio 0.5, nsigma 0.6, constant 1, eps 1e-3, at most 6 steps), followed by SFDA. Everything
runs on the pooled rows in float64, on copies (the reference overwrites its input).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg


def _biased_cov(rows):
    return np.atleast_2d(np.cov(rows.T, bias=True))


def _shrunk(cov, shrinkage):
    d = cov.shape[0]
    out = (1.0 - shrinkage) * cov
    out[np.diag_indices(d)] += shrinkage * np.trace(cov) / d
    return out


def _top_eigenvalue(a, iterations=3):
    """``iterative_A``: 3 power-iteration double steps from the row sums, Rayleigh-like quotient."""
    x = a.sum(axis=1)
    for _ in range(iterations):
        y = a @ x
        y = y / np.linalg.norm(y)
        x = a @ y
        x = x / np.linalg.norm(x)
    return x @ a @ y


def _softmax(scores):
    z = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _fit_lda(x, labels, shrinkage=None):
    """The reference's ``SFDA.fit``: returns (coef, intercept, shrinkage)."""
    classes = np.unique(labels)
    priors = np.array([np.mean(labels == c) for c in classes])
    means = np.array([x[labels == c].mean(axis=0) for c in classes])
    within = sum(p * _biased_cov(x[labels == c]) for p, c in zip(priors, classes))
    if shrinkage is None:
        shrinkage = max(np.exp(-5.0 * _top_eigenvalue(within)), 1e-10)
    total = _shrunk(_biased_cov(x), shrinkage)
    within_shrunk = _shrunk(within, shrinkage)
    evals, evecs = scipy.linalg.eigh(total - within_shrunk, within_shrunk)
    evecs = evecs[:, np.argsort(evals)[::-1]]
    coef = means @ evecs @ evecs.T
    intercept = -0.5 * np.einsum("cd,cd->c", means, coef) + np.log(priors)
    return coef, intercept, shrinkage


def sfda(features, labels, source_probs=None):
    """SFDA_Score: LDA, double softmax, ConfMix towards the other classes' mean, LDA again."""
    x = np.array(features, dtype=np.float64, copy=True)
    n = len(labels)
    coef, intercept, shrinkage = _fit_lda(x, labels)
    prob = _softmax(x @ coef.T + intercept)
    prob = np.exp(prob) / np.exp(prob).sum(axis=1, keepdims=True)
    classes = np.unique(labels)
    means = np.array([x[labels == c].mean(axis=0) for c in classes])
    others = (means.sum(axis=0) - means) / (len(classes) - 1)
    mixed = x.copy()
    for c in range(len(classes)):
        rows = np.flatnonzero(labels == c)
        own = prob[rows, c][:, None]
        mixed[rows] = own * x[rows] + (1.0 - own) * others[c]
    coef, intercept, _ = _fit_lda(mixed, labels, shrinkage)
    prob = _softmax(mixed @ coef.T + intercept)
    return float(prob[np.arange(n), labels].sum() / n)


def _one_step_ped(x, labels, mean, std, time_step, nsigma, constant):
    """One_Step_PED: push overlapping classes apart, in the reference's standardised space."""
    z = (x - mean) / std
    classes = np.unique(labels)
    means = np.array([z[labels == c].mean(axis=0) for c in classes])
    radius = np.sqrt(np.array([z[labels == c].var(axis=0).sum() for c in classes]))
    push = np.zeros_like(means)
    for a in range(len(classes)):
        for b in range(a + 1, len(classes)):
            diff = means[b] - means[a]
            dist = np.sqrt(np.sum(diff**2))
            overlap = max(abs(nsigma) * radius[b] + abs(nsigma) * radius[a] - dist, 0.0)
            step = min(0.5 * time_step**2 * constant * overlap, overlap) * diff / dist
            push[a] -= step
            push[b] += step
    moved = (z + push[labels]) * std + mean
    return moved, float(np.sum(np.abs(push)))


def ped(features, labels, source_probs=None, reference_mean=None, reference_std=None,
        exit_ratio=0.5, time_step=0.1, nsigma=0.6, constant=1.0, eps=1e-3):
    """PED_Score(type='SFDA'). Without a reference set, the standardisation is the identity."""
    x = np.array(features, dtype=np.float64, copy=True)
    d = x.shape[1]
    mean = np.zeros(d) if reference_mean is None else np.asarray(reference_mean, dtype=np.float64)
    std = np.ones(d) if reference_std is None else np.maximum(np.asarray(reference_std, dtype=np.float64), eps)
    first = None
    for step in range(6):
        moved, change = _one_step_ped(x, labels, mean, std, time_step, nsigma, constant)
        if step == 0:
            first = change
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.float64(change) / first
        if not ratio > exit_ratio:
            break
        x = moved
    return sfda(x, labels)


REFERENCES = {"sfda": sfda, "ped": ped}

# None needed: at d > n (lambda at its 1e-10 floor, cond(Shr(S_w)) ~ 1e11) the posteriors of
# the rows are one-hot and both the reference and fedmte give exactly 1. Observed agreement
# is <= 4e-16 everywhere except large_offset (4e-12 sfda, 9e-11 ped), where the rows-based
# reference loses digits to the 1e3 offset; fedmte matches the reference run on centred rows
# there to 6e-16.
TOLERANCES: dict[tuple[str, str], tuple[float, str]] = {}
