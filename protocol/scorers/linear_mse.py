"""LinearMSE: the negative mean squared error of a ridge probe from features to one-hot labels.

No reference code exists; the definition follows Nguyen et al. (UAI 2023, "negative
regularized MSE of a linear regression"), implemented as scikit-learn's ``Ridge(alpha=1)``
with an unpenalised intercept: score = -(1/n) sum_i ||y_i - yhat_i||^2 on the training rows.

Range: [-(1 - 1/C), 0]. The RSS is >= 0, and the ridge optimum costs at most W = 0 does, whose
RSS is tr(Y_c^T Y_c) = n (1 - sum_c pi_c^2) <= n (1 - 1/C).
"""

from __future__ import annotations

import numpy as np

from fedmte.protocol.scorers.base import Context, Program, ScorerSpec, require_classes
from fedmte.protocol.scorers.moments import Moments, moment_requests

ALPHA = 1.0


def program(ctx: Context, alpha: float = ALPHA) -> Program:
    m = Moments.from_sums((yield moment_requests(ctx)), ctx)
    require_classes(m.counts, "linear_mse")
    n, d = m.n, m.dim
    priors = m.counts / n
    # Centred cross-products: X_c^T X_c, X_c^T Y_c and tr(Y_c^T Y_c), with Y one-hot.
    xty = m.class_sums.T - np.outer(m.mean, m.counts)
    yty_trace = float(n - n * priors @ priors)
    weights = np.linalg.solve(m.scatter + alpha * np.eye(d), xty)
    # Ridge normal equations give RSS = tr(Y^T Y) - tr(W^T X^T Y) - alpha ||W||^2.
    rss = yty_trace - np.sum(weights * xty) - alpha * np.sum(weights * weights)
    return -rss / n


SPEC = ScorerSpec(
    name="linear_mse",
    program=program,
    rounds=1,
    needs_features=True,
    needs_source_probs=False,
    centred=True,
    summary="negative training MSE of a ridge probe (alpha=1, free intercept) onto one-hot labels",
    reference="Nguyen et al. UAI 2023 definition; checked against sklearn.linear_model.Ridge",
    options={"alpha": ALPHA},
    bounds=lambda ctx: (-(1.0 - 1.0 / ctx.num_classes), 0.0),
)
