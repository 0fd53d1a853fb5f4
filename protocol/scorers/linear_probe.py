"""Linear probe: an exact federated fit of a classifier head, validated on held-back rows.

Not a transferability estimate but the check of one: the confirmation stage of a job
(issue 13) trains the head a candidate would get and measures it on rows the fit never saw.

Split. Each site splits its rows once, by the coordinator's ``seed``: row i is held back for
validation when a sha256 of the seed and the row's id falls below ``holdout``
(:func:`fedmte.protocol.catalogue.holdout_mask`); the ids are the rows' places in the site's
data, so the split is the same in every round, for every model and on every re-run of a
data version. Only sums over a part ever leave a site.

Fit. L2-regularised multinomial logistic regression with an intercept on the training rows,

    f(W) = sum_i [logsumexp(z_i) - z_{i, y_i}] + (l2 / 2) ||W[:-1]||_F^2,  z_i = W^T [x_i, 1],

W of shape (k + 1, C), the intercept row W[-1] unpenalised. Adding a constant to every
intercept changes no probability, so f is flat along that one direction u; the fit is the
minimiser whose intercepts sum to zero (the gradient is orthogonal to u, the step is taken
orthogonal to it, and the start W = 0 lies in that subspace). Everywhere else f is strictly
convex (l2 > 0 on the weights; the intercepts' curvature is sum_i diag(p_i) - p_i p_i^T,
positive definite off u while every class has training rows), so the minimiser is unique.

Newton's method, each round one release: the sites sum the loss, the gradient and the
Hessian (``probe_loss``, ``probe_gradient``, ``probe_hessian``) at the broadcast W; the
coordinator adds the penalty, solves H s = g (a Cholesky solve of the symmetrised,
Jacobi-scaled H; where that fails, as a noisy H can make it, its eigendecomposition with the
eigenvalues taken in absolute value and floored at 1e-10 times the largest, so the step is
still a descent direction) and tries W - t s, t = 1, halved while the loss
does not decrease by 1e-4 t g.s (Armijo; each try costs a round, with exact sums the full
step is almost always taken). It stops when the step is below ``tolerance`` times
(1 + max |W|) or after ``max_rounds`` rounds, and then asks once, on the held-back rows, for
the per-class counts of correct argmax predictions and of rows: the score is their ratio,
the validated accuracy. All candidates of a job run in the same rounds (the plan batches
models), so a job costs the rounds of its slowest candidate, typically 6 to 10 plus one.

Under DP every statistic carries a declared sensitivity (:mod:`fedmte.protocol.dp`): the
gradient and Hessian through the clip norm, the loss through the broadcast W, the counts by
1; the Newton rounds then run on noisy sums, the loss test guards against bad steps, and
``max_rounds`` bounds the releases (each is charged like any other).

The parameters number (k + 1) C, and the Hessian's upper triangle ((k + 1) C)^2 / 2: at most
:data:`MAX_PARAMETERS` parameters are fitted; project wider features first.

:func:`fit` is the program that returns the whole fit (:class:`ProbeFit`: the weights, the
counts, the rounds); the registered program returns its accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
from scipy import linalg
from threadpoolctl import threadpool_limits

from fedmte.protocol import symmetric
from fedmte.protocol.catalogue import MAX_SPLIT_SEED
from fedmte.protocol.errors import InvalidInputError, ScorerDomainError
from fedmte.protocol.requests import Stat, Transform
from fedmte.protocol.scorers.base import Context, Program, Requests, ScorerSpec, Sums, probability_bounds

DEFAULT_L2 = 1.0
DEFAULT_HOLDOUT = 0.2
DEFAULT_SEED = 0
DEFAULT_MAX_ROUNDS = 20
ROUND_CAP = 40
"""The most Newton rounds ``max_rounds`` may ask for (the registry states rounds up front)."""
DEFAULT_TOLERANCE = 1e-10
MAX_PARAMETERS = 2048
ARMIJO = 1e-4
EIGEN_FLOOR = 1e-10
LOSS_SLACK = 1e-12
"""Relative rounding slack on the loss test, so a step that only rounding makes look worse
near the optimum is still taken."""


@dataclass(frozen=True)
class ProbeFit:
    """A fitted probe: ``weights`` (k + 1, C), the last row the intercepts; per-class counts of
    correct held-back predictions, of held-back rows and of training rows; Newton rounds used."""

    weights: np.ndarray
    correct: np.ndarray
    held_back: np.ndarray
    train_counts: np.ndarray
    rounds: int
    converged: bool

    @property
    def accuracy(self) -> float:
        return float(self.correct.sum()) / float(self.held_back.sum())


def split_args(seed: int, holdout: float) -> dict[str, np.ndarray]:
    """The split's broadcast arguments, shared by every request of one probe."""
    return {"seed": np.asarray(seed, dtype=np.int64), "holdout": np.asarray(holdout, dtype=np.float64)}


def _check_options(dim: int, classes: int, l2: float, max_rounds: int, seed: int, holdout: float,
                   tolerance: float) -> None:
    if not (isinstance(l2, (int, float)) and math.isfinite(l2) and l2 > 0):
        raise InvalidInputError(f"linear_probe's l2 must be a positive number, got {l2!r}")
    if not (isinstance(max_rounds, int) and 1 <= max_rounds <= ROUND_CAP):
        raise InvalidInputError(f"linear_probe's max_rounds must be an integer in [1, {ROUND_CAP}], got {max_rounds!r}")
    if not (isinstance(seed, int) and 0 <= seed <= MAX_SPLIT_SEED):
        raise InvalidInputError(f"linear_probe's seed must be an integer in [0, {MAX_SPLIT_SEED}], got {seed!r}")
    if not (isinstance(holdout, (int, float)) and 0.0 < holdout < 1.0):
        raise InvalidInputError(f"linear_probe's holdout must lie in (0, 1), got {holdout!r}")
    if not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise InvalidInputError(f"linear_probe's tolerance must be positive, got {tolerance!r}")
    if (dim + 1) * classes > MAX_PARAMETERS:
        raise ScorerDomainError(
            f"linear_probe fits (k + 1) C = {(dim + 1) * classes} parameters, above its {MAX_PARAMETERS}; "
            "project the features to fewer dimensions first"
        )


def newton_step(gradient: np.ndarray, hessian: np.ndarray, intercepts: slice) -> np.ndarray:
    """s with H s = g off the flat intercept direction u (g and s taken orthogonal to u, and
    u u^T added to H so the system is regular); see the module notes for the solve."""
    size = gradient.size
    u = np.zeros(size)
    u[intercepts] = 1.0
    u /= np.linalg.norm(u)
    g = gradient.ravel() - (gradient.ravel() @ u) * u
    h = 0.5 * (hessian + hessian.T) + np.outer(u, u)
    # Jacobi scaling first: features far from the origin (a large common offset) make H's
    # weight and intercept entries differ by many orders, which the floor must not mistake
    # for noise; Newton's step itself does not depend on the scaling.
    scale = np.sqrt(np.maximum(np.abs(np.diagonal(h)), 1e-300))
    scaled = h / np.outer(scale, scale)
    with threadpool_limits(1, user_api="blas"):  # one factorisation of a few hundred rows: threads only contend
        step = _solve(scaled, g / scale) / scale
    step -= (step @ u) * u
    return step.reshape(gradient.shape)


def _solve(scaled: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    try:  # exact sums: H is positive definite off u, and a Cholesky solve is all it takes
        factor = linalg.cho_factor(scaled, lower=True, check_finite=False)
        if np.diagonal(factor[0]).min() ** 2 < EIGEN_FLOOR * np.diagonal(factor[0]).max() ** 2:
            raise np.linalg.LinAlgError("nearly singular")
        return linalg.cho_solve(factor, rhs, check_finite=False)
    except np.linalg.LinAlgError:  # a noisy or nearly singular H: its eigenvalues, repaired
        values, vectors = np.linalg.eigh(scaled)
        values = np.abs(values)
        values = np.maximum(values, EIGEN_FLOOR * max(float(values.max()), 1e-300))
        return vectors @ ((vectors.T @ rhs) / values)


def fit(ctx: Context, *, l2: float = DEFAULT_L2, max_rounds: int = DEFAULT_MAX_ROUNDS, seed: int = DEFAULT_SEED,
        holdout: float = DEFAULT_HOLDOUT, tolerance: float = DEFAULT_TOLERANCE) -> Generator[Requests, Sums, ProbeFit]:
    """The probe's rounds (module notes); returns the whole :class:`ProbeFit`."""
    k, classes = ctx.dim, ctx.num_classes
    _check_options(k, classes, l2, max_rounds, seed, holdout, tolerance)
    split = split_args(seed, holdout)
    penalised = np.ones((k + 1, classes))
    penalised[-1] = 0.0
    intercepts = slice(k * classes, (k + 1) * classes)

    def requests(weights: np.ndarray, first: bool) -> Requests:
        out = {kind: Stat.of(f"probe_{kind}", (), weights=weights, **split) for kind in ("loss", "gradient", "hessian")}
        if first:
            out["train_counts"] = Stat.of("holdout_class_counts", part=0, **split)
        return out

    def objective(weights: np.ndarray, sums: Sums) -> tuple[float, np.ndarray, np.ndarray]:
        value = float(sums["loss"]) + 0.5 * l2 * float(np.sum((weights * penalised) ** 2))
        gradient = np.asarray(sums["gradient"], dtype=np.float64) + l2 * weights * penalised
        hessian = symmetric.unpack(np.asarray(sums["hessian"], dtype=np.float64))
        hessian.flat[:: hessian.shape[0] + 1] += l2 * penalised.ravel()
        return value, gradient, hessian

    weights = np.zeros((k + 1, classes))
    sums = yield requests(weights, True)
    train_counts = np.asarray(sums["train_counts"])
    empty = np.flatnonzero(train_counts <= 0)
    if empty.size:
        raise ScorerDomainError(
            f"linear_probe has no training rows of classes {empty.tolist()} (the held-back split took them all, "
            "or the data have none), so its intercepts have no finite fit; drop those classes or hold back less"
        )
    value, gradient, hessian = objective(weights, sums)
    rounds = 1

    def small(step: np.ndarray, at: np.ndarray) -> bool:
        return float(np.abs(step).max()) <= tolerance * (1.0 + float(np.abs(at).max()))

    step = newton_step(gradient, hessian, intercepts)
    converged = small(step, weights)
    t = 1.0
    while not converged and rounds < max_rounds:
        trial = weights - t * step
        sums = yield requests(trial, False)
        rounds += 1
        trial_value, trial_gradient, trial_hessian = objective(trial, sums)
        decrease = float(gradient.ravel() @ step.ravel())
        if math.isfinite(trial_value) and trial_value <= value - ARMIJO * t * decrease + LOSS_SLACK * max(1.0, abs(value)):
            weights, value, gradient, hessian = trial, trial_value, trial_gradient, trial_hessian
            step = newton_step(gradient, hessian, intercepts)
            converged = small(step, weights)
            t = 1.0
        else:
            t /= 2.0
    return (yield from _validated("linear_probe", weights, split, train_counts, rounds, converged))


def _validated(name: str, weights: np.ndarray, split: dict[str, np.ndarray], train_counts: np.ndarray, rounds: int,
               converged: bool) -> Generator[Requests, Sums, ProbeFit]:
    """The last round of every probe: the held-back rows' per-class counts of correct argmax
    predictions under ``weights``, and of rows."""
    sums = yield {"correct": Stat.of("probe_correct", (), weights=weights, **split),
                  "held_back": Stat.of("holdout_class_counts", part=1, **split)}
    held_back = np.asarray(sums["held_back"])
    if not float(held_back.sum()) > 0:
        raise ScorerDomainError(f"{name}'s split held back no rows to validate on; hold back more, or use more rows")
    return ProbeFit(weights=weights, correct=np.asarray(sums["correct"]), held_back=held_back,
                    train_counts=train_counts, rounds=rounds, converged=converged)


def program(ctx: Context, **options: object) -> Program:
    probe = yield from fit(ctx, **options)  # type: ignore[arg-type]
    return probe.accuracy


DEFAULT_SHRINKAGE = 0.1


def lda_fit(ctx: Context, *, shrinkage: float = DEFAULT_SHRINKAGE, seed: int = DEFAULT_SEED,
            holdout: float = DEFAULT_HOLDOUT) -> Generator[Requests, Sums, ProbeFit]:
    """The closed-form probe: a shrunk LDA head on the training rows, then the same held-back
    validation. Two rounds whatever the data: round 1 sums the training part's class counts,
    class sums and Gram (the ``keep_part`` view zeroes the held-back rows), the coordinator
    solves W[:-1] = S^-1 M, W[-1] = -diag(M^T S^-1 M) / 2 + log(n_c / n) with M the class
    means and S = (1 - shrinkage) S_w / n + shrinkage tr(S_w / n) / k I the shrunk within-class
    covariance, its eigenvalues floored at the shrinkage target (DP noise can leave S_w
    indefinite; exact sums never reach the floor); round 2 counts correct held-back predictions. With noise it needs no Hessian,
    whose (k + 1)^2 C^2 / 2 entries the Newton probe's first round must release: the cheap
    first stage of a confirmation under DP."""
    k, classes = ctx.dim, ctx.num_classes
    if not (isinstance(shrinkage, (int, float)) and 0.0 < shrinkage <= 1.0):
        raise InvalidInputError(f"lda_probe's shrinkage must lie in (0, 1], got {shrinkage!r}")
    _check_options(k, classes, DEFAULT_L2, 1, seed, holdout, DEFAULT_TOLERANCE)
    split = split_args(seed, holdout)
    train = (Transform.of("keep_part", part=np.asarray(0, dtype=np.int64), **split),)
    sums = yield {"train_counts": Stat.of("holdout_class_counts", part=0, **split),
                  "class_sums": Stat.of("class_sums", train), "gram": Stat.of("gram", train)}
    train_counts = np.asarray(sums["train_counts"])
    counts = train_counts.astype(np.float64)
    if (counts <= 0).any():
        raise ScorerDomainError(f"lda_probe has no training rows of classes {np.flatnonzero(counts <= 0).tolist()}; "
                                "hold back less, or use more rows")
    n = float(counts.sum())
    means = np.asarray(sums["class_sums"], dtype=np.float64) / counts[:, None]  # (C, k)
    within = symmetric.unpack(np.asarray(sums["gram"], dtype=np.float64)) - (means.T * counts) @ means
    cov = within / n
    target = float(np.trace(cov)) / k
    if not target > 0:
        raise ScorerDomainError("lda_probe's within-class covariance has no positive trace (the noise swamped it)")
    cov = (1.0 - shrinkage) * 0.5 * (cov + cov.T) + shrinkage * target * np.eye(k)
    values, vectors = np.linalg.eigh(cov)
    values = np.maximum(values, shrinkage * target)  # noise can leave S_w indefinite; the shrinkage target floors it
    solved = vectors @ ((vectors.T @ means.T) / values[:, None])  # S^-1 M, (k, C)
    weights = np.zeros((k + 1, classes))
    weights[:-1] = solved
    weights[-1] = -0.5 * np.einsum("kc,ck->c", solved, means) + np.log(counts / n)
    return (yield from _validated("lda_probe", weights, split, train_counts, 1, True))


def lda_program(ctx: Context, **options: object) -> Program:
    probe = yield from lda_fit(ctx, **options)  # type: ignore[arg-type]
    return probe.accuracy


LDA_SPEC = ScorerSpec(
    name="lda_probe",
    program=lda_program,
    rounds=2,
    needs_features=True,
    needs_source_probs=False,
    summary="held-back accuracy of a shrunk LDA head fitted in closed form on the training rows (no Hessian)",
    reference="confirmation by transfer (issue 13): the same closed form on the pooled training rows",
    opt_in=True,
    options={"shrinkage": DEFAULT_SHRINKAGE, "seed": DEFAULT_SEED, "holdout": DEFAULT_HOLDOUT},
    bounds=probability_bounds,
)

SPEC = ScorerSpec(
    name="linear_probe",
    program=program,
    rounds=ROUND_CAP + 1,
    needs_features=True,
    needs_source_probs=False,
    summary="held-back accuracy of an L2 multinomial logistic-regression head fitted exactly by federated Newton rounds",
    reference="confirmation by transfer (issue 13): a centralised L-BFGS fit on the pooled training rows",
    iterative=True,
    opt_in=True,
    options={"l2": DEFAULT_L2, "max_rounds": DEFAULT_MAX_ROUNDS, "seed": DEFAULT_SEED, "holdout": DEFAULT_HOLDOUT,
             "tolerance": DEFAULT_TOLERANCE},
    bounds=probability_bounds,
)
