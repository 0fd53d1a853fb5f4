"""One round trip over Flower's Grid, with the ServerApp's own short poll loop.

Stock ``Grid.send_and_receive`` sleeps 3 s between polls (``HttpGrid.send_and_receive`` in
flwr 1.42.0), which alone costs up to 3 s per round. :class:`FlowerExchange` pushes the
round's messages with the public ``push_messages`` and polls ``pull_messages`` every
``poll_interval`` seconds instead.

A second delay sits in ``flwr.supercore.inflatable.inflatable_utils.pull_objects``: when a
reply's metadata arrives before its arrays are uploaded, the puller backs off 1 s, then 2,
4, ... (``PULL_INITIAL_BACKOFF = 1``). :func:`tune_pull_backoff` lowers those defaults in
the ServerApp process. That reaches into Flower internals, listed once in
:mod:`fedmte.flower_pin`, whose check fails loudly when Flower changes. The sites' half of the latency (the SuperNode's 3 s idle polls, a new ClientApp
process per message) is the site runner's business: :mod:`fedmte.client.site_runner`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from flwr.app import Message
from flwr.serverapp import Grid

from fedmte import flower_pin
from fedmte.flower_records import payload_from_record, payload_to_record
from fedmte.protocol.errors import FederationError, FedmteError
from fedmte.protocol.wire import Payload, message_type

POLL_INTERVAL = 0.01
POLL_INTERVAL_MAX = 0.25
POLL_GROWTH = 1.2
"""Seconds between ``pull_messages`` calls while a round is open: ``POLL_INTERVAL`` at first,
growing by ``POLL_GROWTH`` per empty poll up to ``POLL_INTERVAL_MAX`` (stock: a fixed 3 s)."""

PULL_INITIAL_BACKOFF = 0.02
PULL_BACKOFF_CAP = 0.5
"""Object-pull backoff used instead of Flower's 1 s initial and 10 s cap."""


def tune_pull_backoff(initial: float = PULL_INITIAL_BACKOFF, cap: float = PULL_BACKOFF_CAP) -> None:
    """Lower the object-pull backoff of every ``pull_objects`` call in this process."""
    flower_pin.tune_pull_backoff(initial, cap)


class FlowerExchange:
    """An :class:`~fedmte.server.rounds.Exchange` over a ServerApp's ``Grid``.

    ``nodes`` is fixed when the exchange is made (after waiting for ``min_sites``), so every
    round of a job goes to the same sites.
    """

    def __init__(
        self,
        grid: Grid,
        *,
        min_sites: int = 1,
        connect_timeout: float = 60.0,
        round_timeout: float = 300.0,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self._grid = grid
        self._round_timeout = round_timeout
        self._poll = poll_interval
        deadline = time.monotonic() + connect_timeout
        nodes = sorted(grid.get_node_ids())
        while len(nodes) < min_sites and time.monotonic() < deadline:
            time.sleep(0.2)
            nodes = sorted(grid.get_node_ids())
        if len(nodes) < min_sites:
            raise FederationError(
                f"only {len(nodes)} site(s) connected within {connect_timeout:.0f} s; the job needs {min_sites}"
            )
        self._nodes = tuple(nodes)

    @property
    def nodes(self) -> Sequence[int]:
        return self._nodes

    def exchange(self, query: str, payloads: Mapping[int, Payload], *, group: str) -> dict[int, Payload]:
        """Push one message per node, then poll until every node replied or the round times out."""
        replies, failures = self.gather(query, payloads, group=group)
        if failures:
            detail = "; ".join(f"site {node}: {reason}" for node, reason in sorted(failures.items()))
            raise FederationError(f"{message_type(query)} round {group} failed at {len(failures)} site(s): {detail}",
                                  failures=failures)
        return replies

    def gather(self, query: str, payloads: Mapping[int, Payload], *, group: str) -> tuple[dict[int, Payload], dict[str, str]]:
        """Like :meth:`exchange`, but return ``(replies, failures)`` instead of raising: the
        secure sum carries on without sites that dropped out (``failures`` maps node id to reason)."""
        nodes = list(payloads)
        messages = [
            Message(payload_to_record(payloads[node]), dst_node_id=node, message_type=message_type(query), group_id=group)
            for node in nodes
        ]
        ids = list(self._grid.push_messages(messages))
        if len(ids) != len(nodes) or any(not ident for ident in ids):
            raise FederationError(f"the SuperLink did not accept every {message_type(query)} message of round {group}")
        node_of = dict(zip(ids, nodes))
        pending = set(ids)
        replies: dict[int, Payload] = {}
        failures: dict[str, str] = {}
        deadline = time.monotonic() + self._round_timeout
        wait = self._poll
        while pending:
            for reply in self._grid.pull_messages(sorted(pending)):
                wait = self._poll
                ident = reply.metadata.reply_to_message_id
                if ident not in pending:
                    continue
                pending.discard(ident)
                node = node_of[ident]
                if reply.has_error():
                    failures[str(node)] = f"error {reply.error.code}: {reply.error.reason}"
                    continue
                try:
                    replies[node] = payload_from_record(reply.content)
                except FedmteError as error:
                    failures[str(node)] = f"malformed reply: {error}"
            if not pending:
                break
            if time.monotonic() > deadline:
                for ident in pending:
                    failures[str(node_of[ident])] = f"no reply within {self._round_timeout:.0f} s"
                break
            time.sleep(wait)
            wait = min(wait * POLL_GROWTH, POLL_INTERVAL_MAX)
        return replies, failures
