"""TransRate: the coding rate of the features minus the mean coding rate within classes.

Follows tllib ``ranking.transrate.transrate`` (the paper's appendix code): eps = 1e-4,
R(Z) = 1/2 logdet(I + Z^T Z / (n eps)) on globally centred features, and
TrR = R(Z) - (1/C) sum_c R(Z_c) with C = max(y) + 1.

No range is declared. It is >= 0 for balanced classes (logdet is concave and the total
scatter is the n_c/n-weighted mix of the class ones), but the reference weighs the classes
by 1/C, so a rare class with a wide spread can make it negative (seen on real numbers).

Reference: Huang et al., "Frustratingly Easy Transferability Estimation", ICML 2022.
"""

from __future__ import annotations

import numpy as np

from fedmte.protocol import symmetric
from fedmte.protocol.requests import Stat
from fedmte.protocol.scorers.base import Context, Program, ScorerSpec, require_classes

EPSILON = 1e-4


def coding_rate(scatter: np.ndarray, n: int, eps: float = EPSILON) -> float:
    """1/2 logdet(I + Z^T Z / (n eps)) from the scatter Z^T Z of n rows.

    An empty class has no rows and no coding rate: fedmte gives it 0 (logdet I), where the
    reference divides by zero and returns NaN.
    """
    if n == 0:
        return 0.0
    sign, logdet = np.linalg.slogdet(np.eye(scatter.shape[0]) + scatter / (n * eps))
    return 0.5 * float(logdet)


def program(ctx: Context, eps: float = EPSILON) -> Program:
    view = ctx.centred_view
    sums = yield {
        "counts": Stat.of("class_counts"),
        "class_sums": Stat.of("class_sums", view),
        "class_scatters": Stat.of("class_scatters", view),
    }
    counts = np.asarray(sums["counts"])
    require_classes(counts, "transrate")
    n = int(counts.sum())
    class_sums = sums["class_sums"]
    scatters = symmetric.unpack(sums["class_scatters"])
    mu = class_sums.sum(axis=0) / n
    total = coding_rate(scatters.sum(axis=0) - n * np.outer(mu, mu), n, eps)
    within = 0.0
    for c, count in enumerate(counts):
        # Rows of class c, centred by the *global* mean: Z_c^T Z_c = S_c - s_c mu^T - mu s_c^T + n_c mu mu^T.
        z = scatters[c] - np.outer(class_sums[c], mu) - np.outer(mu, class_sums[c]) + count * np.outer(mu, mu)
        within += coding_rate(z, int(count), eps)
    return total - within / len(counts)


SPEC = ScorerSpec(
    name="transrate",
    program=program,
    rounds=1,
    needs_features=True,
    needs_source_probs=False,
    centred=True,
    summary="coding rate of all features minus the mean coding rate within each class",
    reference="tllib ranking.transrate.transrate (Huang et al. 2022)",
    options={"eps": EPSILON},
)
