"""Honest uncertainty for scores computed from DP-noised sums: a parametric bootstrap.

Under DP each site adds Gaussian noise of a public standard deviation to every block it
releases, and the coordinator knows the pooled std of every block it received (the sites
declare it). So it can redraw that noise itself: add fresh N(0, sigma^2) noise to the
released sums, clean them exactly as the released ones were cleaned
(:mod:`fedmte.protocol.dp_postprocess`), and re-run the scorers. The spread of the
replicate scores is the spread the noise puts on each score. This reads released values
only: post-processing, at no privacy cost.

What one replicate can re-run: a scorer whose every request is a block of the release. A
multi-round scorer whose later request is built from earlier sums (LEEP's conditional,
SFDA's discriminant, an EM step) asks, in a replicate, for a statistic the sites never
computed; that replicate is NaN for it (its interval is then unknown, not zero).

Pure numpy, no I/O.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from threadpoolctl import threadpool_limits

from fedmte.protocol.dp_postprocess import clean_block
from fedmte.protocol.errors import FedmteError
from fedmte.protocol.plan import PlanRun, ScoringPlan
from fedmte.protocol.requests import Stat
from fedmte.protocol.scorers import SCORERS
from fedmte.protocol.scorers.base import Bounds, Context
from fedmte.protocol.statistics import Statistics

IntervalMethod = Literal["basic", "percentile"]
MIN_FINITE_SHARE = 0.5
"""An interval needs at least this share of finite replicates; with fewer, the noise
leaves the scorer undefined too often for its spread to mean anything."""


@dataclass(frozen=True)
class NoisyRelease:
    """What one model's plan received: the pooled blocks (every round, as fed to the scorers,
    already cleaned) by stat key, and the pooled per-entry noise std of each (0.0: exact).

    ``clean``: whether the coordinator cleaned the noisy sums before scoring; the replicates
    are cleaned the same way, so they mimic the released scores.
    """

    sums: Statistics
    sigma: Mapping[str, float]
    clean: bool = True

    @property
    def exact(self) -> bool:
        """No block carries noise: every replicate equals the released scores."""
        return not any(float(self.sigma.get(key, 0.0)) > 0 for key in self.sums)


def kind_of(key: str) -> str:
    """The statistic kind of a request key (:attr:`Stat.key` is ``"<kind>:<digest>"``)."""
    return key.partition(":")[0]


def _noisy_blocks(release: NoisyRelease, replicates: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every noised block, stacked over replicates (R, *shape): value + N(0, sigma^2) per
    entry, integer blocks rounded, then cleaned with the same sigma. Drawn key by key in
    sorted order, so a seed gives the same replicates whatever the dict order."""
    stacked: dict[str, np.ndarray] = {}
    for key in sorted(release.sums):
        sigma = float(release.sigma.get(key, 0.0))
        if not sigma > 0:
            continue
        value = release.sums[key]
        noisy = value + rng.normal(0.0, sigma, size=(replicates, *value.shape))
        if value.dtype.kind == "i":
            noisy = np.rint(noisy).astype(np.int64)
        stacked[key] = clean_block(kind_of(key), noisy, sigma) if release.clean else noisy
    return stacked


def _release_offset(plan: ScoringPlan, release: NoisyRelease, dim: int) -> np.ndarray:
    """The offset the released run used: PlanRun's own centring rule on the released count
    and sum when the plan had a centring round, else zero."""
    if not plan.centring_round:
        return np.zeros(dim)
    count, total = Stat.of("count").key, Stat.of("sum").key
    if count not in release.sums or total not in release.sums:
        raise FedmteError("the release lacks the centring round's count and sum; pass the offset the run used")
    return release.sums[total] / max(int(release.sums[count]), 1)


_REPLICATE_ERRORS = (FedmteError, ArithmeticError, ValueError, np.linalg.LinAlgError)
"""What noisy sums can make a scorer raise besides a recorded domain failure (a singular
solve, a log of a negative number): that replicate is NaN, as a failure is."""


def _run_one(sub: ScoringPlan, blocks: Mapping[str, np.ndarray], *, dim: int, num_classes: int,
             num_source_classes: int, offset: np.ndarray, projection: np.ndarray | None = None) -> float:
    """One scorer on one replicate's blocks; NaN when it fails or asks for a block the
    release does not hold."""
    try:
        run = PlanRun(sub, dim=dim, num_classes=num_classes, num_source_classes=num_source_classes,
                      offset=offset, record_failures=True, projection=projection)
        while (requests := run.pending()) is not None:
            if any(s.key not in blocks for s in requests):
                return math.nan
            run.feed(Statistics({s.key: blocks[s.key] for s in requests}))
        return run.result().scores.get(sub.scorers[0], math.nan)
    except _REPLICATE_ERRORS:
        return math.nan


def bootstrap_scores(
    plan: ScoringPlan,
    release: NoisyRelease,
    *,
    dim: int,
    num_classes: int,
    num_source_classes: int = 0,
    offset: np.ndarray | None = None,
    replicates: int = 200,
    rng: np.random.Generator,
    projection: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """``{scorer: (replicates,) scores}`` of ``plan`` on parametric resamples of ``release``.

    Replicate r adds fresh N(0, sigma^2) noise to every released block, rounds integer
    blocks, cleans them as the release was cleaned, and re-runs each scorer (clamped to its
    range, as :class:`PlanRun` does) at ``offset``: the one the released run used (None:
    derived as that run did, zero without a centring round). NaN where a replicate failed or
    asked for a statistic the release lacks. Each scorer runs as its own plan, so one that
    needs a missing block fails alone. With no noise every replicate is the released score.
    ``projection``: the basis the run's requests were projected by (:class:`PlanRun`); the
    offset is then in the projected coordinates, as the run's.
    """
    if replicates < 1:
        raise ValueError(f"replicates must be at least 1, got {replicates}")
    width = dim if projection is None else int(np.shape(projection)[1])
    start = _release_offset(plan, release, width) if offset is None else np.asarray(offset, dtype=np.float64)
    subs = {name: ScoringPlan(scorers=(name,), options={name: plan.options[name]} if name in plan.options else {})
            for name in plan.scorers}
    draws = 1 if release.exact else replicates
    out = {name: np.full(draws, np.nan) for name in plan.scorers}
    # One BLAS thread: the matrices are small (d x d), and a threaded eigh of a noisy (indefinite)
    # 64 x 64 matrix took 40 ms instead of 0.7 ms on a busy 2-core machine.
    with warnings.catch_warnings(), np.errstate(all="ignore"), threadpool_limits(1, user_api="blas"):
        warnings.simplefilter("ignore")  # a noisy replicate may warn (EM not converged); its failure is the NaN
        stacked = _noisy_blocks(release, draws, rng)
        for r in range(draws):
            blocks = {key: stacked[key][r] if key in stacked else value for key, value in release.sums.items()}
            for name, sub in subs.items():
                out[name][r] = _run_one(sub, blocks, dim=dim, num_classes=num_classes,
                                        num_source_classes=num_source_classes, offset=start, projection=projection)
    if draws != replicates:
        out = {name: np.repeat(values, replicates) for name, values in out.items()}
    return out


def score_bounds(scorers: Sequence[str], *, dim: int, num_classes: int, num_source_classes: int = 0) -> dict[str, Bounds]:
    """Each scorer's provable range (:attr:`ScorerSpec.bounds`) for one model, for clipping
    its intervals; scorers without one are left out."""
    ctx = Context(num_classes, dim, num_source_classes, np.zeros(dim))
    return {name: bound(ctx) for name in scorers if (bound := SCORERS[name].bounds) is not None}


def interval(
    point: float,
    replicates: np.ndarray,
    level: float = 0.9,
    *,
    method: IntervalMethod = "basic",
    bounds: tuple[float | None, float | None] | None = None,
) -> tuple[float, float] | None:
    """A ``level`` confidence interval for the exact-sum score from the released ``point``
    and its bootstrap ``replicates`` (NaN: failed replicates, left out).

    ``basic`` (the default): [2 point - q_hi, 2 point - q_lo], with q the replicate
    quantiles. It treats point - truth as distributed like replicate - point, so it corrects
    the bias that noise plus cleaning put on a score (flooring a noisy Gram's eigenvalues
    shrinks H-score, a noisy count shifts LogME): the replicates carry that bias a second
    time, and the percentile interval ([q_lo, q_hi]) doubles it instead of removing it.
    On the tests' Gaussian data the basic interval covers the truth at the nominal rate
    where the percentile one falls short (tests/test_uncertainty.py). The interval is
    clipped to ``bounds`` (the scorer's range), which only drops impossible values.

    None when fewer than half the replicates are finite. All replicates equal to the point
    (no noise) give [point, point]. A strongly biased score can give a basic interval that
    leaves out the released point itself: that is the bias correction, not an error.
    """
    values = np.asarray(replicates, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if not math.isfinite(point) or finite.size == 0 or finite.size < MIN_FINITE_SHARE * values.size:
        return None
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    q_lo, q_hi = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    low, high = (2 * point - q_hi, 2 * point - q_lo) if method == "basic" else (q_lo, q_hi)
    low, high = float(low), float(high)
    lower, upper = bounds or (None, None)
    if lower is not None:
        low, high = max(low, lower), max(high, lower)
    if upper is not None:
        low, high = min(low, upper), min(high, upper)
    return low, high


__all__ = ["NoisyRelease", "bootstrap_scores", "interval", "kind_of", "score_bounds"]
