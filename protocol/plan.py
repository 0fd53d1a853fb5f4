"""Scoring plans: merge the scorers' rounds and drive them over any transport.

:func:`make_plan` checks the requested scorers against the registry and the inputs, and
states the number of statistics rounds up front. :func:`execute` runs every scorer program
in lockstep: round ``k`` of all scorers (and all their identical requests) is one call of
``aggregate``, the transport that returns the sums over all sites. ``fedmte.score`` passes
in-memory sites; the federation passes a secure-sum round over the network.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from fedmte.protocol.catalogue import STATISTICS, Batch, accumulate, expected_shape
from fedmte.protocol.errors import InvalidInputError, NotFederableError, ScorerDomainError, UnknownScorerError
from fedmte.protocol.requests import Stat, Transform
from fedmte.protocol.scorers import NOT_FEDERABLE, SCORERS
from fedmte.protocol.scorers.base import Context, Program
from fedmte.protocol.statistics import Statistics

Aggregate = Callable[[Sequence[Stat]], Statistics]
CLAMP_TOLERANCE = 1e-9
"""Relative slack (times max(1, |bound|)) before a value counts as outside its range, so
float rounding of an exact value at its bound (H-score = C - 1 when d >= n - 1) is no clamp."""


@dataclass(frozen=True)
class ScoringPlan:
    """The scorers of one job, their options, and whether a centring round comes first."""

    scorers: tuple[str, ...]
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    centring_round: bool = False

    @property
    def rounds(self) -> int:
        """Statistics rounds the job will take at most (iterative scorers may stop earlier)."""
        longest = max((SCORERS[name].rounds for name in self.scorers), default=0)
        return longest + int(self.centring_round)


@dataclass
class RoundRecord:
    """What one round asked for and how many bytes each site sent for it."""

    kinds: list[str]
    nbytes: int


@dataclass
class ScoringResult:
    scores: dict[str, float]
    rounds: list[RoundRecord]
    failures: dict[str, str] = field(default_factory=dict)
    clamped: dict[str, float] = field(default_factory=dict)
    """Scorers whose value fell outside their provable range (:attr:`ScorerSpec.bounds`),
    by raw value; ``scores`` holds the bound instead. Only noisy sums get there."""

    @property
    def bytes_sent_per_site(self) -> int:
        return sum(r.nbytes for r in self.rounds)


def clamp(value: float, bounds: tuple[float | None, float | None] | None) -> float:
    """``value`` moved into ``bounds`` when it lies outside by more than :data:`CLAMP_TOLERANCE`."""
    low, high = bounds or (None, None)
    if low is not None and value < low - CLAMP_TOLERANCE * max(1.0, abs(low)):
        return float(low)
    if high is not None and value > high + CLAMP_TOLERANCE * max(1.0, abs(high)):
        return float(high)
    return value


def default_scorers(*, has_features: bool, has_source_probs: bool) -> tuple[str, ...]:
    """Every federable scorer the inputs allow, except the opt-in ones (iterative, partial)."""
    return tuple(
        name
        for name, spec in SCORERS.items()
        if not (spec.iterative or spec.opt_in)
        and (has_features or not spec.needs_features)
        and (has_source_probs or not spec.needs_source_probs)
    )


def make_plan(
    scorers: Sequence[str] | None,
    *,
    has_features: bool,
    has_source_probs: bool,
    public_offset: bool = False,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> ScoringPlan:
    """Validate scorer names against the registry and the available inputs.

    ``public_offset`` says the caller already agreed an offset, so no centring round is
    needed. Raises :class:`UnknownScorerError`, :class:`NotFederableError` or
    :class:`InvalidInputError` (a scorer needs source probabilities that were not given).
    """
    if scorers is None:
        names = default_scorers(has_features=has_features, has_source_probs=has_source_probs)
    else:
        names = tuple(dict.fromkeys(scorers))
        if not names:
            raise InvalidInputError("no scorers requested; name at least one or pass None for all")
    for name in names:
        if name in NOT_FEDERABLE:
            raise NotFederableError(f"{name} cannot be federated: {NOT_FEDERABLE[name]}")
        if name not in SCORERS:
            raise UnknownScorerError(
                f"unknown scorer {name!r}; choose from: {', '.join(SCORERS)}"
            )
        spec = SCORERS[name]
        if spec.needs_source_probs and not has_source_probs:
            raise InvalidInputError(
                f"{name} needs the source model's class probabilities (source_probs); "
                "pass them or drop the scorer"
            )
        if spec.needs_features and not has_features:
            raise InvalidInputError(f"{name} needs features")
    options = {name: dict(opts) for name, opts in (options or {}).items()}
    for name, opts in options.items():
        if name not in names:
            raise InvalidInputError(f"options given for {name!r}, which is not among the scorers {names}")
        unknown = set(opts) - set(SCORERS[name].options)
        if unknown:
            raise InvalidInputError(
                f"unknown options {sorted(unknown)} for {name}; it takes {sorted(SCORERS[name].options)}"
            )
    centring = not public_offset and any(SCORERS[name].centred for name in names)
    return ScoringPlan(scorers=names, options=options, centring_round=centring)


class PlanRun:
    """One model's plan as a state machine, so a driver can batch many models per round.

    ``pending()`` gives the next round's unique requests (``None`` once every scorer has
    finished); ``feed(sums)`` hands back their sums over all sites. With
    ``record_failures=True`` a scorer whose data leave it undefined
    (:class:`~fedmte.protocol.errors.ScorerDomainError`, or a non-finite score, which noisy
    DP sums can cause) is recorded in ``failures`` and the others go on; otherwise the
    error propagates. A score outside its scorer's provable range is clamped to it and its
    raw value kept in ``clamped``: an impossible value (H-score 86.8 with 10 classes) is
    never reported as a score.
    """

    def __init__(
        self,
        plan: ScoringPlan,
        *,
        dim: int,
        num_classes: int,
        num_source_classes: int = 0,
        offset: np.ndarray | None = None,
        record_failures: bool = False,
        projection: np.ndarray | None = None,
    ) -> None:
        self.plan = plan
        self.dim, self.num_classes, self.num_source_classes = dim, num_classes, num_source_classes
        self.record_failures = record_failures
        self.projection: Transform | None = None
        self.work_dim = dim
        if projection is not None:
            basis = np.asarray(projection, dtype=np.float64)
            if basis.ndim != 2 or basis.shape[0] != dim or not 1 <= basis.shape[1] <= dim:
                raise InvalidInputError(f"the projection must be a ({dim}, k) basis with 1 <= k <= {dim}, "
                                        f"got {basis.shape}")
            self.projection, self.work_dim = Transform.of("project", basis=basis), basis.shape[1]
        self._lifted: dict[str, str] = {}  # request key as sent -> as the programs asked
        self.scores: dict[str, float] = {}
        self.failures: dict[str, str] = {}
        self.clamped: dict[str, float] = {}
        self.log: list[RoundRecord] = []
        self._programs: dict[str, tuple[Program, dict[str, Stat]]] = {}
        self._rounds_used = 0
        self._probe: tuple[Stat, Stat] | None = None
        width = self.work_dim
        if offset is None and plan.centring_round:
            self._probe = (Stat.of("count"), Stat.of("sum"))
            self.ctx = Context(num_classes, width, num_source_classes, np.zeros(width))
        else:
            self._start(np.zeros(width) if offset is None else offset)

    def _start(self, offset: np.ndarray) -> None:
        offset = np.asarray(offset, dtype=np.float64)
        if offset.shape != (self.work_dim,):
            raise InvalidInputError(f"the offset must have shape ({self.work_dim},), got {offset.shape}")
        self.ctx = Context(self.num_classes, self.work_dim, self.num_source_classes, offset)
        for name in self.plan.scorers:
            program = SCORERS[name].program(self.ctx, **self.plan.options.get(name, {}))
            self._advance(name, program, None)

    def pending(self) -> list[Stat] | None:
        """The next round's unique requests, or ``None`` when the plan is done (with a
        projection, each request's view starts with it: the programs never see it)."""
        if self._probe is not None:
            asked = list(self._probe)
        elif not self._programs:
            return None
        else:
            asked = list({s.key: s for _, reqs in self._programs.values() for s in reqs.values()}.values())
        return [self._lift(stat) for stat in asked]

    def _lift(self, stat: Stat) -> Stat:
        """``stat`` as sent: its view behind the projection, where the statistic reads features."""
        if self.projection is None or not STATISTICS[stat.kind].needs_features:
            self._lifted[stat.key] = stat.key
            return stat
        lifted = Stat(stat.kind, (self.projection, *stat.view), stat.args)
        self._lifted[lifted.key] = stat.key
        return lifted

    def expected(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype of every pending sum, to validate what comes back."""
        stats = self.pending() or []
        return {s.key: expected_shape(s, self.dim, self.num_classes, self.num_source_classes) for s in stats}

    def feed(self, sums: Statistics) -> None:
        """Hand back the sums over all sites of exactly the pending requests."""
        requests = self.pending()
        if requests is None:
            raise RuntimeError("the plan is already done")
        sums.check_shapes(self.expected())
        self.log.append(RoundRecord(kinds=sorted({s.kind for s in requests}), nbytes=sums.nbytes))
        sums = Statistics({self._lifted[s.key]: sums[s.key] for s in requests})  # as the programs asked
        if self._probe is not None:
            count, total = self._probe
            self._probe = None
            self._start(sums[total.key] / max(int(sums[count.key]), 1))
            return
        self._rounds_used += 1
        for name, (program, reqs) in list(self._programs.items()):
            if self._rounds_used > SCORERS[name].rounds:
                raise RuntimeError(f"{name} asked for more than its declared {SCORERS[name].rounds} rounds")
            self._advance(name, program, {local: sums[s.key] for local, s in reqs.items()})

    def result(self) -> ScoringResult:
        if self.pending() is not None:
            raise RuntimeError("the plan has not finished")
        return ScoringResult(
            scores={name: self.scores[name] for name in self.plan.scorers if name in self.scores},
            rounds=self.log,
            failures=dict(self.failures),
            clamped=dict(self.clamped),
        )

    def _advance(self, name: str, program: Program, sums: dict[str, np.ndarray] | None) -> None:
        try:
            requests = next(program) if sums is None else program.send(sums)
        except StopIteration as done:
            self._programs.pop(name, None)
            value = float(done.value)
            if not np.isfinite(value):
                if self.record_failures:  # e.g. DP noise made a count negative under a log
                    self.failures[name] = (f"the summed statistics left {name} undefined (score {value}); "
                                           "with DP noise, a noisy count or joint can leave a scorer's domain")
                    return
                raise RuntimeError(f"{name} produced a non-finite score {value}; this is a bug") from None
            bounds = SCORERS[name].bounds
            kept = clamp(value, None if bounds is None else bounds(self.ctx))
            if kept != value:
                self.clamped[name] = value
            self.scores[name] = kept
            return
        except ScorerDomainError as error:
            if not self.record_failures:
                raise
            self._programs.pop(name, None)
            self.failures[name] = str(error)
            return
        self._programs[name] = (program, requests)


def execute(
    plan: ScoringPlan,
    aggregate: Aggregate,
    *,
    dim: int,
    num_classes: int,
    num_source_classes: int = 0,
    offset: np.ndarray | None = None,
) -> ScoringResult:
    """Run ``plan`` to the end and return the scores and the per-round traffic."""
    run = PlanRun(plan, dim=dim, num_classes=num_classes, num_source_classes=num_source_classes, offset=offset)
    while (requests := run.pending()) is not None:
        run.feed(aggregate(requests))
    return run.result()


def execute_many(
    runs: Mapping[str, PlanRun],
    aggregate_many: Callable[[Mapping[str, Sequence[Stat]]], Mapping[str, Statistics]],
) -> dict[str, ScoringResult]:
    """Drive several models' plans in lockstep: one ``aggregate_many`` call per round
    carries every unfinished model's requests, so rounds do not grow with the models."""
    while True:
        pending = {model: reqs for model, run in runs.items() if (reqs := run.pending()) is not None}
        if not pending:
            return {model: run.result() for model, run in runs.items()}
        sums = aggregate_many(pending)
        for model in pending:
            runs[model].feed(sums[model])


TRACE_DIM, TRACE_CLASSES, TRACE_SOURCE_CLASSES, TRACE_ROWS = 4, 3, 3, 60


@cache
def traced_requests(scorer: str) -> tuple[frozenset[str], frozenset[str]]:
    """(statistic kinds, feature transforms) a scorer's program requests, found by running its
    plan once on seeded toy data (every round, centring included). What a site's policy must
    allow for it, and what the site's budget split (``dp.allocate_sigmas``, ``by_scorer``)
    counts as that scorer's blocks. Iterative scorers may ask for fewer kinds on other data,
    never for others."""
    rng = np.random.default_rng(0)
    labels = np.arange(TRACE_ROWS) % TRACE_CLASSES
    batch = Batch(features=rng.normal(size=(TRACE_ROWS, TRACE_DIM)) + labels[:, None], labels=labels,
                  num_classes=TRACE_CLASSES, source_probs=rng.dirichlet(np.ones(TRACE_SOURCE_CLASSES), TRACE_ROWS),
                  row_ids=np.arange(TRACE_ROWS))
    plan = make_plan([scorer], has_features=True, has_source_probs=True)
    run = PlanRun(plan, dim=TRACE_DIM, num_classes=TRACE_CLASSES, num_source_classes=TRACE_SOURCE_CLASSES,
                  record_failures=True)
    kinds: set[str] = set()
    transforms: set[str] = set()
    while (pending := run.pending()) is not None:
        kinds.update(stat.kind for stat in pending)
        transforms.update(step.op for stat in pending for step in stat.view)
        run.feed(accumulate(list(pending), [batch]))
    return frozenset(kinds), frozenset(transforms)
