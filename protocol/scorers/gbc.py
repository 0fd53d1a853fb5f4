"""GBC: Gaussian Bhattacharyya coefficient, the overlap of per-class Gaussians.

Follows google-research ``stable_transfer/transferability/gbc.py`` ``get_gbc_score``: per
class the mean and population variance (clipped at 1e-4); spherical Gaussians (the mean of
the variances, the default) or diagonal ones; GBC = -sum over ordered pairs of present
classes of exp(-D_B). ``gbc_pca`` (two rounds) reproduces the reference pipeline, which
first reduces the features to 64 dimensions by PCA; it lives in
:mod:`fedmte.protocol.scorers.gbc_pca`.

Reference: Pandy et al., "Transferability Estimation using Bhattacharyya Class
Separability", CVPR 2022.

Range: [-C(C - 1), 0]. Each Bhattacharyya distance of two Gaussians is >= 0 (a Mahalanobis
term and, per coordinate, log((a + b)/2) >= (log a + log b)/2), so each of the at most
C(C - 1) ordered pairs adds a coefficient exp(-D_B) in (0, 1]. :func:`gbc_bounds`.
"""

from __future__ import annotations

import numpy as np

from fedmte.protocol.errors import InvalidInputError
from fedmte.protocol.requests import Stat, View
from fedmte.protocol.scorers.base import Bounds, Context, Program, Requests, ScorerSpec, Sums, require_classes

VARIANCE_FLOOR = 1e-4
GAUSSIAN_TYPES = ("spherical", "diagonal")


def class_moment_requests(view: View) -> Requests:
    return {
        "counts": Stat.of("class_counts"),
        "class_sums": Stat.of("class_sums", view),
        "class_sq_sums": Stat.of("class_sq_sums", view),
    }


def gbc_from_class_moments(counts: np.ndarray, class_sums: np.ndarray, class_sq_sums: np.ndarray, gaussian_type: str) -> float:
    """GBC from per-class counts (C,), sums (C, k) and sums of squares (C, k)."""
    if gaussian_type not in GAUSSIAN_TYPES:
        raise InvalidInputError(f"gaussian_type must be one of {GAUSSIAN_TYPES}, got {gaussian_type!r}")
    present = require_classes(counts, "gbc")
    n_c = counts[present, None].astype(np.float64)
    means = class_sums[present] / n_c
    variances = np.maximum(class_sq_sums[present] / n_c - means**2, VARIANCE_FLOOR)
    if gaussian_type == "spherical":
        variances = variances.mean(axis=1, keepdims=True)
    total = 0.0
    for a in range(len(present)):
        avg = (variances[a] + variances) / 2.0  # (P, k) or (P, 1)
        first = np.sum((means[a] - means) ** 2 / avg, axis=1) / 8.0
        second = np.sum(np.log(avg), axis=1) - 0.5 * np.sum(np.log(variances[a])) - 0.5 * np.sum(np.log(variances), axis=1)
        coefficient = np.exp(-(first + 0.5 * second))
        total += np.delete(coefficient, a).sum()  # not sum - self: self is 1, the rest can be ~1e-9
    return float(-total)


def gbc_bounds(ctx: Context) -> Bounds:
    """[-C(C - 1), 0]: see the module docstring."""
    return (-float(ctx.num_classes * (ctx.num_classes - 1)), 0.0)


def program(ctx: Context, gaussian_type: str = "spherical") -> Program:
    sums: Sums = yield class_moment_requests(ctx.centred_view)
    return gbc_from_class_moments(sums["counts"], sums["class_sums"], sums["class_sq_sums"], gaussian_type)


SPEC = ScorerSpec(
    name="gbc",
    program=program,
    rounds=1,
    needs_features=True,
    needs_source_probs=False,
    centred=True,
    summary="minus the total Bhattacharyya overlap of per-class Gaussians (spherical or diagonal)",
    reference="google-research stable_transfer gbc.get_gbc_score (Pandy et al. 2022), no PCA",
    bounds=gbc_bounds,
    options={"gaussian_type": "spherical"},
)
