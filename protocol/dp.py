"""Differential-privacy math for a site's releases: Gaussian-DP accounting and sensitivities.

Every release a site makes is a Gaussian mechanism: block ``b`` of the summed statistics gets
independent N(0, sigma_b^2) noise on each coordinate, and one record moves the block by at
most its L2 sensitivity Delta_b. Such a release is mu-GDP (Gaussian differential privacy,
Dong, Roth and Su, "Gaussian Differential Privacy", JRSS-B 2022) with

    mu = sqrt(sum_b (Delta_b / sigma_b)^2),

and GDP composes exactly: k releases touching the same records are mu_total-GDP with
``mu_total = sqrt(mu_1^2 + ... + mu_k^2)`` (blocks, models, rounds and dataset versions
alike). A mu-GDP mechanism is (epsilon, delta)-DP for every epsilon >= 0 with the dual

    delta(epsilon) = Phi(-epsilon/mu + mu/2) - e^epsilon * Phi(-epsilon/mu - mu/2)

(Dong-Roth-Su, Corollary 2.13; Balle and Wang, "Improving the Gaussian mechanism", ICML
2018, Theorem 8, the same curve for one Gaussian). :func:`gdp_epsilon` and :func:`gdp_mu`
invert it numerically. The classic sigma = Delta*sqrt(2 ln(1.25/delta))/epsilon is only
proven for epsilon < 1 and is not used.

Sensitivities (``SENSITIVITY``) assume the rows a statistic reads have L2 norm at most C,
which the site enforces by clipping the model's output in its own code
(:func:`fedmte.client.privacy.clip_rows`), and that source probabilities lie in the
simplex. A feature view (offset, projection, class shift) can lengthen clipped rows;
:func:`row_bound` gives the bound after a view. Derivations, add/remove neighbours, one
row f with ||f|| <= C and label k:

- count, class_counts, hard_joint: one entry moves by 1.
- sum, class_sums: the row f itself, ||f|| <= C.
- gram (packed upper triangle of f f^T): sqrt(sum_{i<=j} f_i^2 f_j^2)
  = sqrt((||f||^4 + sum_j f_j^4) / 2) <= C^2; class_scatters: the same in one class row.
- class_sq_sums: f * f, whose norm sqrt(sum_j f_j^4) <= ||f||^2 <= C^2.
- norm4_sum: ||f||^4 <= C^4; norm2_weighted_sum: || ||f||^2 f || = ||f||^3 <= C^3.
- soft_joint: theta in the simplex, ||theta||_2 <= 1.
- true_class_prob_sum: a probability, in [0, 1].
- tilted_joint, gmm_soft_joint: softmax outputs, in the simplex (as soft_joint);
  class_prob_outer_sums: packed p p^T with p in the simplex, norm <= ||p||^2 <= 1.
- The linear probe's kinds read the row with a constant 1 appended, x~ = [x, 1], of norm
  at most A = sqrt(C^2 + 1) (C the view's row bound); W is the broadcast (k + 1) x C probe,
  p = softmax(W^T x~), e_k the label's indicator. probe_gradient adds x~ (p - e_k)^T, of
  Frobenius norm ||x~|| ||p - e_k|| <= sqrt(2) A, since ||p - e_k||^2 = (1 - p_k)^2 +
  sum_{c != k} p_c^2 <= 2 (1 - p_k)^2 <= 2. probe_hessian adds (x~ x~^T) kron S with
  S = diag(p) - p p^T, PSD, whose eigenvalues lie in [0, max p] (rank-one interlacing below
  diag(p)) and sum to tr S = 1 - ||p||^2 <= 1 - (max p)^2, so ||S||_F^2 <= max p (1 - (max p)^2)
  <= 2 / (3 sqrt 3) and the packed block moves by at most kappa A^2, kappa = sqrt(2 / (3 sqrt 3))
  = 0.6204 (the upper triangle holds a subset of the entries). probe_loss adds
  l = logsumexp(z) - z_k in [0, log C_t + 2 max_c |z_c|], z = W^T x~, |z_c| <= ||W_c|| A
  (W_c the c-th column; C_t the number of classes): bounded through the broadcast W, so the
  site computes the bound from the request (:func:`probe_loss_bound`), never from the data; a
  larger W only buys more noise. probe_correct and holdout_class_counts: one count moves
  by 1. Which part of the split a row falls in is a function of the public seed and the
  row's own id (:func:`fedmte.protocol.catalogue.holdout_mask`), so adding or removing a row
  moves no other row between the parts (ids are part of the records: a data version's rows
  keep theirs).
- mixture_loglik and the other kinds in ``UNBOUNDED``: no finite bound (or one the
  coordinator's arguments control); refused under DP until the site computes a clipped
  variant (e.g. max(-L, log p), sensitivity L).

Replace-one neighbours: at most twice the add/remove value, and sqrt(2) times it where the
two rows' contributions are non-negative or land in different entries (derivations inline).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import optimize, special

from fedmte.protocol.errors import InvalidInputError, UnknownStatisticError
from fedmte.protocol.requests import Stat, View

Neighbouring = Literal["add_remove", "replace_one"]

# Bisection and root-finding tolerance for the epsilon <-> mu conversions.
CONVERSION_XTOL = 1e-12
# Largest mu any conversion searches up to: mu = 64 is (epsilon ~ 2000, delta)-DP, nothing a
# site policy would accept.
MU_SEARCH_MAX = 64.0


# --------------------------------------------------------------------------- GDP accounting

def gdp_delta(mu: float, epsilon: float) -> float:
    """delta(epsilon) of a mu-GDP mechanism (the GDP duality formula, module docstring).

    The second term is computed as exp(epsilon + log Phi(.)) so it stays finite for large
    epsilon, where e^epsilon overflows and Phi underflows.
    """
    if mu < 0 or epsilon < 0 or math.isnan(mu) or math.isnan(epsilon):
        raise InvalidInputError(f"gdp_delta needs mu >= 0 and epsilon >= 0, got mu={mu}, epsilon={epsilon}")
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    first = float(special.ndtr(-epsilon / mu + mu / 2))
    second = math.exp(epsilon + float(special.log_ndtr(-epsilon / mu - mu / 2)))
    return max(0.0, first - second)


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon with delta(epsilon) <= ``delta`` for a mu-GDP mechanism."""
    _check_delta(delta)
    if mu < 0 or math.isnan(mu):
        raise InvalidInputError(f"mu must be >= 0, got {mu}")
    if math.isinf(mu):
        return math.inf
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    high = 1.0
    while gdp_delta(mu, high) > delta:
        high *= 2.0
    return float(optimize.brentq(lambda eps: gdp_delta(mu, eps) - delta, 0.0, high, xtol=CONVERSION_XTOL))


def gdp_mu(epsilon: float, delta: float) -> float:
    """The largest mu whose mechanism is (epsilon, delta)-DP: the budget a policy's
    (epsilon, delta) allows, since delta(epsilon) grows with mu."""
    _check_delta(delta)
    if epsilon < 0 or math.isnan(epsilon):
        raise InvalidInputError(f"epsilon must be >= 0, got {epsilon}")
    if math.isinf(epsilon):
        return math.inf
    if gdp_delta(MU_SEARCH_MAX, epsilon) <= delta:
        raise InvalidInputError(
            f"(epsilon={epsilon}, delta={delta}) allows mu above {MU_SEARCH_MAX}, which is no privacy; "
            "choose a smaller epsilon"
        )
    return float(optimize.brentq(lambda mu: gdp_delta(mu, epsilon) - delta, 0.0, MU_SEARCH_MAX,
                                 xtol=CONVERSION_XTOL))


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise InvalidInputError(f"delta must lie in (0, 1), got {delta}")


def compose_mu(mus: Iterable[float]) -> float:
    """mu of the composition of Gaussian releases: sqrt(sum of mu_j^2)."""
    return math.sqrt(math.fsum(mu * mu for mu in mus))


def compose_sq(mu_sq_before: float, mu_release: float) -> float:
    """The ledger's one step: the spent mu^2 after a release of ``mu_release``.

    The ledger and the audit-log verifier both call this one function, so a replay of the
    log reproduces the ledger's float values bit for bit.
    """
    return mu_sq_before + mu_release * mu_release


def release_mu(sensitivities: Sequence[float], sigmas: Sequence[float]) -> float:
    """mu of one release whose block b has sensitivity Delta_b and noise std sigma_b."""
    if len(sensitivities) != len(sigmas):
        raise InvalidInputError("one noise std per block is needed")
    terms = []
    for delta_b, sigma_b in zip(sensitivities, sigmas):
        if delta_b == 0:
            continue
        if sigma_b <= 0:
            return math.inf
        terms.append(delta_b / sigma_b)
    return compose_mu(terms)


def noise_multiplier(mu_release: float, num_blocks: int) -> float:
    """z = sigma_b / Delta_b that gives ``num_blocks`` equally noised blocks a total of
    ``mu_release``: each block is (1/z)-GDP, and sqrt(B)/z = mu."""
    if num_blocks < 1:
        raise InvalidInputError(f"a release needs at least one noised block, got {num_blocks}")
    if not mu_release > 0 or math.isinf(mu_release):
        raise InvalidInputError(f"mu per release must be positive and finite, got {mu_release}")
    return math.sqrt(num_blocks) / mu_release


Allocation = Literal["by_scorer", "by_size", "even"]
ALLOCATIONS: tuple[str, ...] = ("by_scorer", "by_size", "even")


def allocate_sigmas(sensitivities: Sequence[float], entries: Sequence[int], mu: float,
                    rule: Allocation = "by_size", readers: Sequence[Iterable[str]] | None = None) -> list[float]:
    """Noise std per block so that the release is exactly ``mu``-GDP: sqrt(sum (Delta_b/sigma_b)^2) = mu.

    Block b gets a share rho_b of the release's mu^2 and sigma_b = Delta_b / sqrt(rho_b).

    ``"by_size"`` gives rho_b = mu^2 * w_b / sum(w) with w_b = sqrt(entries_b).
    Why: n rows can move block b by up to n*Delta_b, so its noise relative to that scale is
    entries_b * sigma_b^2 / (n Delta_b)^2 = entries_b / (rho_b n^2) summed over its entries.
    Minimising sum_b entries_b / rho_b subject to sum_b rho_b = mu^2 (Lagrange: entries_b /
    rho_b^2 is the same for every b) gives rho_b proportional to sqrt(entries_b): a small block
    (n, class counts) is accurate on little budget and gets little, the Gram gets most.

    ``"by_scorer"`` (the policy's default) first gives every *reader* (one requested score of
    one model: ``readers[b]`` names those that read block b) the same share mu^2 / R, then
    splits each reader's share over the blocks it reads by size, as above; a block several
    readers read adds their parts, a block no reader claims is a reader of its own. Why: by
    size alone minimises the noise summed over blocks, so one scorer's huge block (TransRate's
    per-class scatters, C times the Gram) takes most of the budget and starves the small blocks
    every other scorer depends on; splitting by score first keeps every requested score equally
    well served, and blocks many scores share (class counts, class sums) get the most.
    Without ``readers`` it is ``"by_size"``.

    ``"even"`` gives every block mu^2 / B, sigma_b = Delta_b * sqrt(B) / mu (:func:`noise_multiplier`).

    A block with Delta_b = 0 or no entries cannot move, takes no share and gets sigma 0. The
    split never changes the release's mu: it only moves noise between blocks, so any readers
    (the coordinator names the scores) are safe to follow.
    """
    if len(sensitivities) != len(entries) or (readers is not None and len(readers) != len(entries)):
        raise InvalidInputError("one entry count (and one reader set) per block is needed")
    if rule not in ALLOCATIONS:
        raise InvalidInputError(f"unknown allocation {rule!r}; known: {', '.join(ALLOCATIONS)}")
    if not mu > 0 or math.isinf(mu):
        raise InvalidInputError(f"mu per release must be positive and finite, got {mu}")
    if any(d < 0 or math.isnan(d) or math.isinf(d) for d in sensitivities) or any(e < 0 for e in entries):
        raise InvalidInputError("sensitivities must be finite and >= 0, entry counts >= 0")
    noised = [d > 0 and e > 0 for d, e in zip(sensitivities, entries)]
    if not any(noised):
        return [0.0] * len(sensitivities)
    if rule == "even":
        weights = [1.0 if on else 0.0 for on in noised]
    elif rule == "by_size" or readers is None:
        weights = [math.sqrt(e) if on else 0.0 for e, on in zip(entries, noised)]
    else:
        claimed = [sorted(set(names)) or [f"block:{index}"] for index, names in enumerate(readers)]
        reads: dict[str, float] = {}  # reader -> the summed size weights of the blocks it reads
        for names, e, on in zip(claimed, entries, noised):
            for name in names:
                reads[name] = reads.get(name, 0.0) + (math.sqrt(e) if on else 0.0)
        weights = [math.fsum(math.sqrt(e) / reads[name] for name in names) if on else 0.0
                   for names, e, on in zip(claimed, entries, noised)]
    total = math.fsum(weights)
    return [d * math.sqrt(total / w) / mu if on else 0.0 for d, w, on in zip(sensitivities, weights, noised)]


def gaussian_sigma(sensitivity: float, epsilon: float, delta: float) -> float:
    """Noise std of the analytic Gaussian mechanism: (epsilon, delta)-DP for one block of
    L2 sensitivity ``sensitivity`` (the tightest calibration, Balle-Wang 2018)."""
    return sensitivity / gdp_mu(epsilon, delta)


# --------------------------------------------------------------------------- sensitivities

@dataclass(frozen=True)
class BlockSensitivity:
    """L2 sensitivity of one statistic kind: ``coefficient * C ** clip_power``, where C
    bounds the L2 norm of every row the statistic reads."""

    clip_power: int
    add_remove: float
    replace_one: float
    why: str


SQRT2 = math.sqrt(2.0)

SENSITIVITY: dict[str, BlockSensitivity] = {
    "count": BlockSensitivity(0, 1.0, 0.0, "n moves by 1; replacing a row leaves n unchanged"),
    "class_counts": BlockSensitivity(0, 1.0, SQRT2, "one count moves by 1; a replacement moves two by 1"),
    "sum": BlockSensitivity(1, 1.0, 2.0, "adds f with ||f|| <= C; a replacement adds f - g, ||f - g|| <= 2C"),
    "class_sums": BlockSensitivity(1, 1.0, 2.0, "adds f to one class row; a replacement moves at most 2C"),
    "gram": BlockSensitivity(
        2, 1.0, SQRT2,
        "packed f f^T has norm sqrt((||f||^4 + sum f_j^4)/2) <= C^2; "
        "||f f^T - g g^T||_F^2 = ||f||^4 + ||g||^4 - 2(f.g)^2 <= 2 C^4",
    ),
    "class_sq_sums": BlockSensitivity(
        2, 1.0, SQRT2,
        "f*f has norm sqrt(sum f_j^4) <= C^2; f*f and g*g are non-negative, so their "
        "difference has norm at most sqrt(2) C^2",
    ),
    "class_scatters": BlockSensitivity(2, 1.0, SQRT2, "the gram bound, in one class row"),
    "norm4_sum": BlockSensitivity(4, 1.0, 1.0, "||f||^4 lies in [0, C^4]"),
    "norm2_weighted_sum": BlockSensitivity(3, 1.0, 2.0, "|| ||f||^2 f || = ||f||^3 <= C^3"),
    "soft_joint": BlockSensitivity(
        0, 1.0, SQRT2, "a simplex row has ||theta||_2 <= 1; two simplex rows differ by at most sqrt(2)"
    ),
    "hard_joint": BlockSensitivity(0, 1.0, SQRT2, "one count moves by 1; a replacement moves two"),
    "true_class_prob_sum": BlockSensitivity(0, 1.0, 1.0, "a probability lies in [0, 1]"),
    "tilted_joint": BlockSensitivity(0, 1.0, SQRT2, "the tilted posterior q_i is a softmax output, in the simplex"),
    "gmm_soft_joint": BlockSensitivity(0, 1.0, SQRT2, "mixture responsibilities are a softmax output, in the simplex"),
    "class_prob_outer_sums": BlockSensitivity(
        0, 1.0, SQRT2,
        "packed p p^T for p in the simplex has norm <= ||p||^2 <= 1; p p^T and q q^T are "
        "non-negative, so their difference has norm <= sqrt(2)",
    ),
    # The probe's kinds: C below is the lifted row bound A = sqrt(R^2 + 1) of x~ = [x, 1]
    # (stat_sensitivity lifts it; the module docstring derives each).
    "holdout_class_counts": BlockSensitivity(0, 1.0, SQRT2, "one count moves by 1; a replacement moves two by 1"),
    "probe_correct": BlockSensitivity(0, 1.0, SQRT2, "one held-back row adds at most 1 to one class's count"),
    "probe_gradient": BlockSensitivity(
        1, SQRT2, 2.0 * SQRT2, "x~ (p - e_y)^T has Frobenius norm ||x~|| ||p - e_y|| <= sqrt(2) A; a replacement "
        "moves at most twice that",
    ),
    "probe_hessian": BlockSensitivity(
        2, math.sqrt(2.0 / (3.0 * math.sqrt(3.0))), math.sqrt(4.0 / (3.0 * math.sqrt(3.0))),
        "(x~ x~^T) kron (diag p - p p^T) has norm <= A^2 sqrt(max p (1 - max p^2)) <= 0.6204 A^2; both "
        "terms of a replacement are PSD, so their difference has norm <= sqrt(2) times that",
    ),
    "probe_loss": BlockSensitivity(
        1, 2.0, 2.0, "a cross-entropy in [0, log C + 2 max_c ||W_c|| A]: 2 A max_c ||W_c|| + log C for the "
        "broadcast W (probe_loss_bound), the same for a replacement (both terms lie in that range)",
    ),
}

LIFTED = frozenset({"probe_gradient", "probe_hessian", "probe_loss"})
"""Kinds that read the row with a constant 1 appended (an intercept): their row bound is
sqrt(R^2 + 1) for a view's bound R."""

UNBOUNDED: dict[str, str] = {
    "mixture_loglik": (
        "a sum of log-probabilities is unbounded below (one record can move it by any amount); "
        "it can only be released under DP once the site clips each term to [-L, 0]"
    ),
    "gmm_mixture_loglik": "a sum of log-probabilities, unbounded below (as mixture_loglik)",
    "gmm_loglik": "a sum of Gaussian log-densities, unbounded in both directions",
    "tilted_kl_sum": (
        "a KL term bounded only through the broadcast floor (log(1/floor)); no bound is "
        "declared until the site fixes the floor in its policy"
    ),
    "gmm_moments": (
        "moments about broadcast means grow with ||x - mu_j||^2, which the coordinator's "
        "means control; no bound is declared until the site bounds the means"
    ),
}


def sensitivity(kind: str, clip_norm: float, neighbouring: Neighbouring = "add_remove") -> float:
    """L2 sensitivity of statistic ``kind`` when every row it reads has norm <= ``clip_norm``."""
    if kind in UNBOUNDED:
        raise InvalidInputError(f"statistic {kind!r} has no finite sensitivity: {UNBOUNDED[kind]}")
    if kind not in SENSITIVITY:
        raise UnknownStatisticError(
            f"no sensitivity is known for statistic {kind!r}; known: {', '.join(sorted(SENSITIVITY))}"
        )
    if not clip_norm > 0 or math.isinf(clip_norm):
        raise InvalidInputError(f"the clip norm must be positive and finite, got {clip_norm}")
    entry = SENSITIVITY[kind]
    coefficient = entry.add_remove if neighbouring == "add_remove" else entry.replace_one
    return coefficient * clip_norm ** entry.clip_power


def row_bound(view: View, clip_norm: float) -> float:
    """Bound on the L2 norm of a view's rows when the model's rows have norm <= ``clip_norm``.

    offset: ||x - o|| <= C + ||o||; project: ||x B|| <= ||B||_2 C (spectral norm);
    class_shift: ||x + D[y]|| <= C + max_c ||D_c||; keep_part: a row kept or zeroed, <= C;
    confmix, a convex combination
    p x + (1 - p) M[y]: ||.|| <= max(C, max_c ||M_c||).
    """
    bound = float(clip_norm)
    for step in view:
        arrays = step.arrays
        if step.op == "offset":
            bound += float(np.linalg.norm(arrays["offset"]))
        elif step.op == "project":
            basis = arrays["basis"]
            bound *= float(np.linalg.norm(basis, 2)) if basis.size else 0.0
        elif step.op == "class_shift":
            shift = arrays["shift"]
            bound += float(np.linalg.norm(shift, axis=1).max()) if shift.size else 0.0
        elif step.op == "keep_part":
            pass  # a row is kept or zeroed: its norm never grows
        elif step.op == "confmix":
            others = arrays["others_mean"]
            bound = max(bound, float(np.linalg.norm(others, axis=1).max()) if others.size else 0.0)
        else:
            raise UnknownStatisticError(f"no norm bound is known for transform {step.op!r}")
    return bound


def probe_loss_bound(weights: np.ndarray, lifted_bound: float) -> float:
    """The range [0, B] of one row's cross-entropy under the broadcast probe ``weights``
    ((k + 1) x C) for lifted rows of norm <= ``lifted_bound``: B = log C + 2 A max_c ||W_c||."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] < 1:
        raise InvalidInputError(f"probe_loss needs (k + 1, C) weights, got shape {weights.shape}")
    reach = float(np.linalg.norm(weights, axis=0).max()) if weights.size else 0.0
    return math.log(weights.shape[1]) + 2.0 * lifted_bound * reach


def stat_sensitivity(stat: Stat, clip_norm: float, neighbouring: Neighbouring = "add_remove") -> float:
    """L2 sensitivity of one requested statistic, its view's norm growth included."""
    if stat.kind not in SENSITIVITY:
        return sensitivity(stat.kind, clip_norm, neighbouring)  # raises with the reason
    uses_rows = SENSITIVITY[stat.kind].clip_power > 0
    bound = row_bound(stat.view, clip_norm) if uses_rows else clip_norm
    if stat.kind in LIFTED:
        bound = math.hypot(bound, 1.0)
        if stat.kind == "probe_loss":
            if "weights" not in stat.arrays:
                raise InvalidInputError("probe_loss needs its broadcast weights to bound it")
            sensitivity(stat.kind, clip_norm, neighbouring)  # checks the clip norm
            return probe_loss_bound(stat.arrays["weights"], bound)
    if uses_rows and bound == 0:
        return 0.0
    return sensitivity(stat.kind, bound, neighbouring)
