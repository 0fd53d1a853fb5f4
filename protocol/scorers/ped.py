"""PED: potential energy descent on the class layout, then SFDA, in three rounds.

Follows lixiaotong97/PED ``metrics.py`` ``PED_Score`` / ``One_Step_PED`` with ``type='SFDA'``
and the defaults of its ``evaluate_metric_cpu.py``: time step 0.1, exit ratio 0.5,
nsigma 0.6, constant 1, std floor 1e-3, at most 6 steps.

The reference standardises the features with the mean and std (floored at 1e-3) of a
public reference set, z = (x - m) / s. In that space, per class: mean mu_c and radius
R_c = sqrt(sum_j var_cj) (population variances). Each step, every pair of classes a < b
whose spheres overlap, F = max(nsigma (R_a + R_b) - |mu_b - mu_a|, 0) > 0, is pushed
apart along the line of its means by min(1/2 dt^2 F, F): class a by -, class b by + that
amount times the unit vector (mu_b - mu_a)/|mu_b - mu_a|. A step is kept while its total
displacement sum |push| is more than ``exit_ratio`` times the first step's. The features
are mapped back (x = z s + m), and SFDA scores the moved features.

A step moves every row of a class by the same vector, so class variances never change and
the whole simulation runs on the coordinator from n_c, class sums and class sums of
squares. The sites then only apply x + D[y] (the catalogue's ``class_shift``), with
D = (total push) * s. SFDA's first LDA needs only the priors, the class means of the
moved rows (mu_c + D_c) and their within-class covariance, which the move leaves
unchanged. So PED's round 1 is SFDA's round 1 plus the class sums of squares, rounds 2
and 3 are SFDA's on the view x + D[y], and PED takes the same three rounds as SFDA.

The reference set enters as the option ``reference_std`` (the std of the public set's
features, shape (d,); ``None``, the default, means s = 1, i.e. no standardisation; the
reference code has no such default and requires a reference set). The reference also
subtracts the public set's mean m, but every quantity above is a difference of class
means or a variance, and the back-transform adds m again, so m cancels exactly: the
score does not depend on it (the tests show it on the reference transcription), and
fedmte does not ask for it. Like SFDA, PED is translation invariant, so all moments are
taken on the centred view.

Range: SFDA's, [0, 1].

Reference: Li et al., "Exploring Model Transferability through the Lens of Potential
Energy", ICCV 2023.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedmte.protocol.errors import InvalidInputError, ScorerDomainError
from fedmte.protocol.requests import Stat, Transform
from fedmte.protocol.scorers.base import Context, Program, ScorerSpec, probability_bounds
from fedmte.protocol.scorers.moments import moment_requests
from fedmte.protocol.scorers.sfda import confmix_rounds, first_round_moments

TIME_STEP = 0.1
EXIT_RATIO = 0.5
NSIGMA = 0.6
MAX_STEPS = 6  # the reference's `while number_step < 6`
STD_FLOOR = 1e-3  # the reference's eps on the reference set's std


def reference_scale(reference_std: Sequence[float] | np.ndarray | None, dim: int) -> np.ndarray:
    """s = max(reference_std, 1e-3), or ones without a reference set."""
    if reference_std is None:
        return np.ones(dim)
    std = np.asarray(reference_std, dtype=np.float64)
    if std.shape != (dim,):
        raise InvalidInputError(
            f"ped's reference_std must have one entry per feature, shape ({dim},), got {std.shape}"
        )
    if not np.all(np.isfinite(std)) or np.any(std < 0):
        raise InvalidInputError("ped's reference_std must be finite and non-negative (np.std of the public set)")
    return np.maximum(std, STD_FLOOR)


def push_step(means: np.ndarray, radius: np.ndarray, nsigma: float, time_step: float) -> np.ndarray:
    """One step's displacement of every class (C, d), in standardised coordinates."""
    a, b = np.triu_indices(len(means), k=1)
    diff = means[b] - means[a]
    dist = np.sqrt(np.sum(diff**2, axis=1))
    if np.any(dist == 0.0):
        pair = int(np.flatnonzero(dist == 0.0)[0])
        raise ScorerDomainError(
            f"ped cannot push classes {int(a[pair])} and {int(b[pair])} apart: their means coincide, "
            "so the direction is undefined (the reference returns NaN); check the labels"
        )
    overlap = np.maximum(abs(nsigma) * (radius[a] + radius[b]) - dist, 0.0)
    move = np.minimum(0.5 * time_step**2 * overlap, overlap)
    step = diff * (move / dist)[:, None]
    push = np.zeros_like(means)
    np.add.at(push, a, -step)
    np.add.at(push, b, step)
    return push


def potential_energy_descent(
    means: np.ndarray, radius: np.ndarray, *, nsigma: float, time_step: float, exit_ratio: float
) -> np.ndarray:
    """Total displacement per class (C, d) after the kept steps (standardised coordinates).

    A step whose total displacement is at most ``exit_ratio`` times the first one's ends
    the descent and is not applied; when nothing overlaps at the start the reference's
    ratio is 0/0 and no step is applied either.
    """
    total = np.zeros_like(means)
    first = 0.0
    for step in range(MAX_STEPS):
        push = push_step(means + total, radius, nsigma, time_step)
        change = float(np.sum(np.abs(push)))
        if step == 0:
            first = change
        if first == 0.0 or not change / first > exit_ratio:
            break
        total += push
    return total


def program(
    ctx: Context,
    reference_std: Sequence[float] | np.ndarray | None = None,
    nsigma: float = NSIGMA,
    time_step: float = TIME_STEP,
    exit_ratio: float = EXIT_RATIO,
) -> Program:
    scale = reference_scale(reference_std, ctx.dim)
    if not (np.isfinite(nsigma) and np.isfinite(time_step) and time_step > 0 and np.isfinite(exit_ratio)):
        raise InvalidInputError("ped's nsigma, time_step (> 0) and exit_ratio must be finite numbers")
    requests = moment_requests(ctx)
    requests["class_sq_sums"] = Stat.of("class_sq_sums", ctx.centred_view)
    sums = yield requests
    m = first_round_moments(sums, ctx, "ped")
    counts = m.counts[:, None].astype(np.float64)
    variances = np.maximum(sums["class_sq_sums"] / counts - m.class_means**2, 0.0)
    radius = np.sqrt(np.sum(variances / scale**2, axis=1))
    push = potential_energy_descent(
        m.class_means / scale, radius, nsigma=float(nsigma), time_step=float(time_step), exit_ratio=float(exit_ratio)
    )
    shift = push * scale
    view = ctx.centred_view + (Transform.of("class_shift", shift=shift),)
    return (yield from confmix_rounds(ctx, view, m.counts, m.class_means + shift, m.within_scatter / m.n))


SPEC = ScorerSpec(
    name="ped",
    program=program,
    rounds=3,
    needs_features=True,
    needs_source_probs=False,
    centred=True,
    summary="SFDA after a potential-energy descent that pushes overlapping classes apart",
    reference="lixiaotong97/PED metrics.PED_Score, type='SFDA' (Li et al. 2023)",
    options={"reference_std": None, "nsigma": NSIGMA, "time_step": TIME_STEP, "exit_ratio": EXIT_RATIO},
    bounds=probability_bounds,
)
