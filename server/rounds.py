"""The coordinator's round driver: a scoring plan run over any message exchange.

:func:`run_scoring` does what ``fedmte.score`` does, but each ``aggregate(requests)`` of
:func:`fedmte.protocol.plan.execute` is one round trip to every site: the requests are
encoded with :func:`~fedmte.protocol.messages.encode_round`, sent as ``query.stats``, and
the sites' replies are combined by an :class:`Aggregator`. The aggregator is the single
coordinator-side seam where the secure sum replaces :class:`PlainSum`: it sees the exchange
(so it can add its own key-agreement and unmasking queries) and the round, and returns only
the sum. Its site-side counterpart is :func:`fedmte.client.queries.answer`, where the
statistics would be masked before they leave.

A setup round (``query.describe``) comes first: every site states its feature width and
number of source classes, which must agree; the coordinator learns no row counts from it.
Nothing here knows Flower; :mod:`fedmte.server.flower_exchange` provides the exchange.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedmte.protocol.errors import FederationError, InvalidInputError
from fedmte.protocol.messages import RoundRequest, encode_round
from fedmte.protocol.plan import ScoringPlan, ScoringResult, execute, make_plan
from fedmte.protocol.requests import Stat
from fedmte.protocol.statistics import Statistics
from fedmte.protocol.wire import DESCRIBE, STATS, Payload


class Exchange(Protocol):
    """Send one payload to each site and collect every reply (one round trip)."""

    @property
    def nodes(self) -> Sequence[int]:
        """The sites taking part, by transport node id."""
        ...

    def exchange(self, query: str, payloads: Mapping[int, Payload], *, group: str) -> dict[int, Payload]:
        """Send ``payloads[node]`` as ``query.<query>`` and return each node's reply.

        Raises :class:`FederationError` naming every site that replied with an error or
        not at all, so a job never continues on a partial sum it did not plan for.
        """
        ...


class Aggregator(Protocol):
    """Turns one round's request into the sum of the sites' statistics.

    An aggregator may also have ``begin_job(exchange, rounds)``, called once with the plan's
    round count before the first round (the secure sum agrees its keys there)."""

    def sum_round(self, exchange: Exchange, request: RoundRequest, arrays: Mapping[str, np.ndarray]) -> Statistics:
        ...


class PlainSum:
    """Send the request to every site and add the replies in the clear.

    The coordinator sees each site's statistics; the secure sum replaces this class and
    nothing else.
    """

    def sum_round(self, exchange: Exchange, request: RoundRequest, arrays: Mapping[str, np.ndarray]) -> Statistics:
        payload = Payload(doc=request.model_dump(mode="json"), arrays=arrays)
        replies = exchange.exchange(STATS, {node: payload for node in exchange.nodes}, group=str(request.round))
        total = Statistics.empty()
        for node in sorted(replies):
            total = total + Statistics.from_arrays(replies[node].arrays)
        return total


@dataclass(frozen=True)
class SiteShape:
    """What every site agreed on in the setup round."""

    dim: int
    num_source_classes: int
    has_features: bool
    has_source_probs: bool


def describe_sites(exchange: Exchange) -> SiteShape:
    """Ask every site for the shape of its data; all sites must agree."""
    if not exchange.nodes:
        raise FederationError("no site is connected to the SuperLink; start the SuperNodes first")
    replies = exchange.exchange(DESCRIBE, {node: Payload() for node in exchange.nodes}, group="setup")
    shapes: dict[int, SiteShape] = {}
    for node, reply in replies.items():
        try:
            shapes[node] = SiteShape(
                dim=int(reply.doc["dim"]),
                num_source_classes=int(reply.doc["num_source_classes"]),
                has_features=bool(reply.doc["has_features"]),
                has_source_probs=bool(reply.doc["has_source_probs"]),
            )
        except (KeyError, TypeError, ValueError):
            raise FederationError(
                f"site {node} sent a malformed description: {reply.doc}", failures={str(node): "malformed describe reply"}
            ) from None
    distinct = set(shapes.values())
    if len(distinct) != 1:
        detail = {str(node): f"{shape}" for node, shape in sorted(shapes.items())}
        raise FederationError(
            "the sites' data do not agree in shape (feature width, source classes); every site must "
            f"extract features with the same model: {detail}",
            failures=detail,
        )
    return distinct.pop()


@dataclass
class RoundTiming:
    """Wall-clock seconds of one round trip, as the coordinator saw it."""

    name: str
    seconds: float


@dataclass
class FederatedAggregate:
    """The ``aggregate`` callable of :func:`execute`: one statistics round per call."""

    exchange: Exchange
    aggregator: Aggregator
    num_classes: int
    timings: list[RoundTiming] = field(default_factory=list)
    round_index: int = 0

    def __call__(self, requests: Sequence[Stat]) -> Statistics:
        self.round_index += 1
        request, arrays = encode_round(requests, round_index=self.round_index, num_classes=self.num_classes)
        start = time.perf_counter()
        sums = self.aggregator.sum_round(self.exchange, request, arrays)
        self.timings.append(RoundTiming(f"round {self.round_index}", time.perf_counter() - start))
        return sums


@dataclass
class FederatedResult:
    """Scores and per-round traffic (from :func:`execute`), plus the round trip times."""

    plan: ScoringPlan
    shape: SiteShape
    sites: int
    result: ScoringResult
    timings: list[RoundTiming]


def run_scoring(
    exchange: Exchange,
    *,
    scorers: Sequence[str] | None,
    num_classes: int,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    offset: np.ndarray | None = None,
    aggregator: Aggregator | None = None,
) -> FederatedResult:
    """Describe the sites, plan the scorers, and execute the plan over ``exchange``."""
    if num_classes < 2:
        raise InvalidInputError(f"a job needs at least two classes, got num_classes={num_classes}")
    start = time.perf_counter()
    shape = describe_sites(exchange)
    setup = RoundTiming("setup (describe)", time.perf_counter() - start)
    plan = make_plan(
        scorers,
        has_features=shape.has_features,
        has_source_probs=shape.has_source_probs,
        public_offset=offset is not None,
        options=options,
    )
    aggregator = aggregator or PlainSum()
    begin_job = getattr(aggregator, "begin_job", None)
    if begin_job is not None:  # the secure sum agrees keys for every round of the plan up front
        begin_job(exchange, plan.rounds)
    aggregate = FederatedAggregate(exchange, aggregator, num_classes)
    result = execute(
        plan,
        aggregate,
        dim=shape.dim,
        num_classes=num_classes,
        num_source_classes=shape.num_source_classes,
        offset=offset,
    )
    return FederatedResult(plan, shape, len(exchange.nodes), result, [setup, *aggregate.timings])
