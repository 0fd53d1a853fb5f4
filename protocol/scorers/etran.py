"""ETran's LDA term: the mean posterior of the true class under a nearest-mean classifier.

Follows mgholamikn/ETran ``metrics.py`` ``LDA_Score`` (class ``LDA``). The reference fits a
shrunk LDA and sets ``coef = M V V^T`` with ``V = np.linalg.eigh(inv(Shr(S_w)) @ S_b)``.
That matrix is not symmetric, but ``eigh`` reads only its lower triangle and returns the
orthonormal eigenvectors of a symmetric matrix, so ``V V^T = I`` and ``coef = M``: S_w, S_b
and the shrinkage drop out. The term is therefore

    etran_lda = (1/n) sum_i softmax_c(x_i . mu_c - 1/2 ||mu_c||^2 + log pi_c)[y_i],

with pi_c = n_c / n and mu_c the class means (no log, as in the reference).

Translation: moving every row by a (x -> x + a, mu_c -> mu_c + a) adds x . a + 1/2 ||a||^2 to
every class's logit alike, which the softmax ignores. So the term is computed in the
agreed offset coordinates, which also keeps digits when the feature mean is large.

Two rounds: (1) class counts and class sums; (2) after the coordinator broadcasts
coef = M and the biases, the sum of p(y_i | x_i) (catalogue ``true_class_prob_sum``).

Scope: ETran (Gholami et al.) ranks models by 0.15 minmax(energy) + 0.85 minmax(LDA), with
both terms min-max scaled across the candidate models (``tw.py``). The energy term is the
mean of the lowest 0.5% of per-row logsumexp energies, an order statistic that sums of
per-site statistics do not give in two rounds. ``etran_lda`` is the LDA term alone, per
model; it is not the combined ETran score.

Range: [0, 1], a mean posterior probability.

Reference: Gholami et al., "ETran: Energy-Based Transferability Estimation", ICCV 2023.
"""

from __future__ import annotations

import numpy as np

from fedmte.protocol.requests import Stat
from fedmte.protocol.scorers.base import Context, Program, ScorerSpec, probability_bounds, require_all_classes


def nearest_mean_classifier(counts: np.ndarray, class_means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """coef = M (C, k) and bias_c = -1/2 ||mu_c||^2 + log pi_c (C,)."""
    priors = counts / counts.sum()
    return class_means, -0.5 * np.einsum("cd,cd->c", class_means, class_means) + np.log(priors)


def program(ctx: Context) -> Program:
    # The same requests as the moment scorers' counts and class sums, so they travel once.
    sums = yield {"counts": Stat.of("class_counts"), "class_sums": Stat.of("class_sums", ctx.centred_view)}
    counts = np.asarray(sums["counts"], dtype=np.int64)
    require_all_classes(counts, "etran_lda")
    coef, bias = nearest_mean_classifier(counts, sums["class_sums"] / counts[:, None])
    sums = yield {"hits": Stat.of("true_class_prob_sum", ctx.centred_view, coef=coef, bias=bias)}
    return float(sums["hits"]) / int(counts.sum())


SPEC = ScorerSpec(
    name="etran_lda",
    program=program,
    rounds=2,
    needs_features=True,
    needs_source_probs=False,
    centred=True,
    summary="ETran's LDA term alone: mean posterior of the true class under a nearest-mean softmax classifier",
    reference="mgholamikn/ETran metrics.LDA_Score (Gholami et al. 2023); not the energy term or the cross-model mix",
    bounds=probability_bounds,
)
