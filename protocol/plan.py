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
from typing import Any

import numpy as np

from fedmte.protocol.catalogue import expected_shape
from fedmte.protocol.errors import InvalidInputError, NotFederableError, UnknownScorerError
from fedmte.protocol.requests import Stat
from fedmte.protocol.scorers import NOT_FEDERABLE, SCORERS
from fedmte.protocol.scorers.base import Context, Program
from fedmte.protocol.statistics import Statistics

Aggregate = Callable[[Sequence[Stat]], Statistics]


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

    @property
    def bytes_sent_per_site(self) -> int:
        return sum(r.nbytes for r in self.rounds)


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


def _expected(stats: Sequence[Stat], ctx: Context) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {s.key: expected_shape(s, ctx.dim, ctx.num_classes, ctx.num_source_classes) for s in stats}


def _round(stats: Sequence[Stat], ctx: Context, aggregate: Aggregate, log: list[RoundRecord]) -> Statistics:
    unique = list({s.key: s for s in stats}.values())
    expected = _expected(unique, ctx)
    sums = aggregate(unique)
    sums.check_shapes(expected)
    log.append(RoundRecord(kinds=sorted({s.kind for s in unique}), nbytes=sums.nbytes))
    return sums


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
    log: list[RoundRecord] = []
    if offset is None:
        offset = np.zeros(dim)
        if plan.centring_round:
            probe = Context(num_classes, dim, num_source_classes, offset)
            n, total = Stat.of("count"), Stat.of("sum")
            sums = _round([n, total], probe, aggregate, log)
            offset = sums[total.key] / max(int(sums[n.key]), 1)
    offset = np.asarray(offset, dtype=np.float64)
    if offset.shape != (dim,):
        raise InvalidInputError(f"the offset must have shape ({dim},), got {offset.shape}")
    ctx = Context(num_classes=num_classes, dim=dim, num_source_classes=num_source_classes, offset=offset)

    scores: dict[str, float] = {}
    pending: dict[str, tuple[Program, dict[str, Stat]]] = {}
    for name in plan.scorers:
        program = SCORERS[name].program(ctx, **plan.options.get(name, {}))
        _advance(name, program, None, pending, scores)
    rounds_used = 0
    while pending:
        rounds_used += 1
        for name in pending:
            if rounds_used > SCORERS[name].rounds:
                raise RuntimeError(f"{name} asked for more than its declared {SCORERS[name].rounds} rounds")
        sums = _round([s for _, reqs in pending.values() for s in reqs.values()], ctx, aggregate, log)
        for name, (program, reqs) in list(pending.items()):
            _advance(name, program, {local: sums[s.key] for local, s in reqs.items()}, pending, scores)
    return ScoringResult(scores={name: scores[name] for name in plan.scorers}, rounds=log)


def _advance(
    name: str,
    program: Program,
    sums: dict[str, np.ndarray] | None,
    pending: dict[str, tuple[Program, dict[str, Stat]]],
    scores: dict[str, float],
) -> None:
    try:
        requests = next(program) if sums is None else program.send(sums)
    except StopIteration as done:
        pending.pop(name, None)
        value = float(done.value)
        if not np.isfinite(value):
            raise RuntimeError(f"{name} produced a non-finite score {value}; this is a bug") from None
        scores[name] = value
        return
    pending[name] = (program, requests)
