"""The coordinator's seams for one statistics round: the :class:`Exchange` that carries
messages and the :class:`Aggregator` that turns the sites' replies into one sum.

:class:`PlainSum` sends the round to every site and adds the replies in the clear; the secure
sum (:class:`~fedmte.server.secure_aggregation.SecureAggregator`) replaces it and nothing else.
Nothing here knows Flower; :mod:`fedmte.server.flower_exchange` provides the exchange.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from fedmte.protocol.job_messages import JobRoundRequest
from fedmte.protocol.statistics import Statistics
from fedmte.protocol.wire import STATS, Payload


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

    def sum_round(self, exchange: Exchange, request: JobRoundRequest, arrays: Mapping[str, np.ndarray]) -> Statistics:
        ...


class PlainSum:
    """Send the request to every site and add the replies in the clear.

    The coordinator sees each site's statistics; the secure sum replaces this class and
    nothing else.
    """

    def sum_round(self, exchange: Exchange, request: JobRoundRequest, arrays: Mapping[str, np.ndarray]) -> Statistics:
        payload = Payload(doc=request.model_dump(mode="json", by_alias=True), arrays=arrays)
        replies = exchange.exchange(STATS, {node: payload for node in exchange.nodes}, group=str(request.round))
        total = Statistics.empty()
        for node in sorted(replies):
            total = total + Statistics.from_arrays(replies[node].arrays)
        return total
