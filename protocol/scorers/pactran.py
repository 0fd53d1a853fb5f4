"""PACTran-Dirichlet and PACTran-Gamma: PAC-Bayesian bounds on re-mapping a source head.

Follows google-research/pactran_metrics ``compute_metrics.py`` (``calculate_pac_dir`` and
``calculate_pac_gamma``, run there with ``alpha = 1``). Both treat the source model's class
probabilities theta (n, Cs) as fixed features and put a prior on the C x Cs matrix that maps
source classes to target classes:

* prior a0_c = alpha n_c / n + 1e-10 for every source class (``PRIOR_FLOOR``);
* 10 mean-field passes (``PASSES``), starting from q = theta:
  a_w = a0 + Y^T q (C x Cs), then
  q_i = softmax_z(log(theta_iz + 1e-10) + psi(a_w[y_i, z]) - psi(sum_c a_w[c, z])) (Dir) or
  q_i = softmax_z(log(theta_iz + 1e-10) + psi(a_w[y_i, z]) - log b_w) with b_w = 1 (Gamma);
* after the passes (a_w is the one computed in the last pass, from the q before it):
  Dir:   -[Cs log C(a0) - sum_z log C(a_w[:, z]) - KL] / (n C), with
         log C(a) = lnGamma(sum a) - sum lnGamma(a) and KL = sum_iz q (log q - log(theta + 1e-10));
  Gamma: [sum_cz (lnGamma(a0_c) - lnGamma(a_w[c, z])) + KL + sum_i log(theta_i . sum_c a_w[c])
         - n] / (n C) + 1.

Federation. Round 1 sums the class counts and the soft joint Y^T theta, giving a_w of pass 1.
A pass needs Y^T q for the q of the previous pass; each site computes q from the broadcast
C x Cs tilt (the digamma terms), so passes 2..10 are one round each. The last round sums KL
(and, for Gamma, sum_i log(theta_i . v) for the broadcast column sums v). 1 + 9 + 1 = 11
rounds, each carrying C x Cs floats (or a scalar or two), whatever n is.

Reference: Ding et al., "PACTran: PAC-Bayesian Metrics for Estimating the Transferability of
Pretrained Models to Classification Tasks", ECCV 2022.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import numpy as np
from scipy.special import digamma, gammaln

from fedmte.protocol.errors import InvalidInputError
from fedmte.protocol.requests import Stat
from fedmte.protocol.scorers.base import Context, Program, Requests, ScorerSpec, Sums

PASSES = 10  # mean-field passes in calculate_pac_dir / calculate_pac_gamma
PRIOR_FLOOR = 1e-10  # added to a0 = alpha n_c / n in the reference
PROB_FLOOR = 1e-10  # log(theta + 1e-10) in the reference
GAMMA_RATE = 1.0  # beta = b_w = 1 in calculate_pac_gamma
DEFAULT_ALPHA = 1.0  # the only value compute_metrics.main uses
ROUNDS = 1 + (PASSES - 1) + 1


def prior(counts: np.ndarray, alpha: float) -> np.ndarray:
    """a0 (C,): the Dirichlet / Gamma prior shape, alpha times the class frequencies."""
    counts = counts.astype(np.float64)
    return alpha * counts / counts.sum() + PRIOR_FLOOR


def dirichlet_tilt(posterior: np.ndarray) -> np.ndarray:
    """psi(a_w) - psi(column sums of a_w), the Dirichlet pass's log-weight per (y, z)."""
    return digamma(posterior) - digamma(posterior.sum(axis=0))


def gamma_tilt(posterior: np.ndarray) -> np.ndarray:
    """psi(a_w) - log b_w, the Gamma pass's log-weight per (y, z)."""
    return digamma(posterior) - np.log(GAMMA_RATE)


def pac_dir_value(a0: np.ndarray, posterior: np.ndarray, kl: float, n: int) -> float:
    """The PACTran-Dirichlet score from a0 (C,), the final a_w (C, Cs) and KL."""
    num_classes, num_source = posterior.shape
    log_c0 = gammaln(a0.sum()) - gammaln(a0).sum()
    log_c = gammaln(posterior.sum(axis=0)) - gammaln(posterior).sum(axis=0)  # (Cs,)
    bound = num_source * log_c0 - log_c.sum() - kl
    return float(-bound / (n * num_classes))


def pac_gamma_value(a0: np.ndarray, posterior: np.ndarray, kl: float, log_mass: float, n: int) -> float:
    """The PACTran-Gamma score; ``log_mass`` = sum_i log(theta_i . sum_c a_w[c] / b_w)."""
    num_classes, num_source = posterior.shape
    prior_terms = (
        num_source * gammaln(a0).sum()
        - gammaln(posterior).sum()
        + np.log(GAMMA_RATE) * (posterior.sum() - num_source * a0.sum())
    )
    bound = prior_terms + kl + log_mass - n
    return float(bound / (n * num_classes) + 1.0)


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not np.isfinite(alpha) or alpha <= 0:
        raise InvalidInputError(f"PACTran's alpha must be a positive number, got {alpha}")
    return alpha


def _passes(
    alpha: float, tilt: Callable[[np.ndarray], np.ndarray]
) -> Generator[Requests, Sums, tuple[np.ndarray, np.ndarray]]:
    """Rounds 1..10: the prior and the mean-field passes; returns a0 (C,) and the last a_w (C, Cs)."""
    sums: Sums = yield {"counts": Stat.of("class_counts"), "joint": Stat.of("soft_joint")}
    a0 = prior(np.asarray(sums["counts"]), alpha)
    posterior = a0[:, None] + sums["joint"]  # pass 1, from q = theta
    for _ in range(PASSES - 1):
        sums = yield {"joint": Stat.of("tilted_joint", tilt=tilt(posterior), floor=PROB_FLOOR)}
        posterior = a0[:, None] + sums["joint"]
    return a0, posterior


def pac_dir_program(ctx: Context, alpha: float = DEFAULT_ALPHA) -> Program:
    alpha = _check_alpha(alpha)
    a0, posterior = yield from _passes(alpha, dirichlet_tilt)
    sums = yield {
        "n": Stat.of("count"),
        "kl": Stat.of("tilted_kl_sum", tilt=dirichlet_tilt(posterior), floor=PROB_FLOOR),
    }
    return pac_dir_value(a0, posterior, float(sums["kl"]), int(sums["n"]))


def pac_gamma_program(ctx: Context, alpha: float = DEFAULT_ALPHA) -> Program:
    alpha = _check_alpha(alpha)
    a0, posterior = yield from _passes(alpha, gamma_tilt)
    # sum_i log(theta_i . v): the mixture log-likelihood with every row of W equal to v
    column_mass = np.broadcast_to(posterior.sum(axis=0) / GAMMA_RATE, posterior.shape)
    sums = yield {
        "n": Stat.of("count"),
        "kl": Stat.of("tilted_kl_sum", tilt=gamma_tilt(posterior), floor=PROB_FLOOR),
        "log_mass": Stat.of("mixture_loglik", weights=column_mass),
    }
    return pac_gamma_value(a0, posterior, float(sums["kl"]), float(sums["log_mass"]), int(sums["n"]))


PAC_DIR = ScorerSpec(
    name="pactran_dir",
    program=pac_dir_program,
    rounds=ROUNDS,
    needs_features=False,
    needs_source_probs=True,
    iterative=True,
    summary="PAC-Bayes bound of a Dirichlet re-mapping of the source head to the target labels",
    reference="google-research/pactran_metrics compute_metrics.calculate_pac_dir (Ding et al. 2022)",
    options={"alpha": DEFAULT_ALPHA},
)

PAC_GAMMA = ScorerSpec(
    name="pactran_gamma",
    program=pac_gamma_program,
    rounds=ROUNDS,
    needs_features=False,
    needs_source_probs=True,
    iterative=True,
    summary="PAC-Bayes bound of a Gamma re-mapping of the source head to the target labels",
    reference="google-research/pactran_metrics compute_metrics.calculate_pac_gamma (Ding et al. 2022)",
    options={"alpha": DEFAULT_ALPHA},
)
