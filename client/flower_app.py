"""The Flower ClientApp: adapts ``query.*`` messages to :mod:`fedmte.client.queries`.

Each message's ``RecordDict`` holds a ``ConfigRecord`` "doc" with the payload's JSON
document, its array layout and, up to ``INLINE_LIMIT`` bytes, the packed arrays; larger
packed arrays travel as a ``uint8`` array in the ``ArrayRecord`` "arrays". The reply has the
same shape. What the site holds comes from the SuperNode's own ``--node-config``, never
from the coordinator: ``site-file`` names a site file (``site.toml``), whose
:class:`~fedmte.client.site_agent.SiteAgent` answers a job's ``setup``, ``stats`` and
``finish`` with candidate models run at the site; ``data-path`` names an ``.npz`` of
precomputed features, answered by :mod:`fedmte.client.queries`. Any error becomes an error
reply, so the coordinator sees the site's reason.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmte.flower_records import payload_from_record, payload_to_record
from fedmte.client import site_agent
from fedmte.client.queries import answer
from fedmte.protocol.errors import InvalidInputError
from fedmte.protocol.job_messages import JOB_QUERIES
from fedmte.client.secure_site import answer_secure, check_plain_statistics_allowed
from fedmte.protocol.wire import QUERIES, SECURE_QUERIES, STATS

DATA_PATH_KEY = "data-path"
"""The node-config key naming the site's data file."""

app = ClientApp()






def _data_path(context: Context) -> Path:
    value = context.node_config.get(DATA_PATH_KEY)
    if not isinstance(value, str) or not value:
        raise InvalidInputError(
            f"this SuperNode has no {DATA_PATH_KEY!r} in its --node-config; start it with "
            f"--node-config '{DATA_PATH_KEY}=\"/path/to/site.npz\"'"
        )
    return Path(value)


def _handler(query: str) -> Callable[[Message, Context], Message]:
    def handle(msg: Message, context: Context) -> Message:
        payload = payload_from_record(msg.content)
        if query in SECURE_QUERIES:  # secure sum: signed steps, answered by the site's SecureSite
            return Message(payload_to_record(answer_secure(query, payload, context.node_config)), reply_to=msg)
        if query == STATS:  # plain sums only where the site's secure.toml allows them
            check_plain_statistics_allowed(context.node_config)
        site_file = context.node_config.get(site_agent.SITE_FILE_KEY)
        if isinstance(site_file, str) and site_file and query in site_agent.AGENT_QUERIES:
            reply = site_agent.answer(query, payload, Path(site_file), run_id=context.run_id)
        else:
            reply = answer(query, payload, _data_path(context))
        return Message(payload_to_record(reply), reply_to=msg)

    handle.__name__ = handle.__qualname__ = f"query_{query}"
    handle.__doc__ = f"``query.{query}``: answered by the site agent (site-file) or fedmte.client.queries (data-path)."
    return handle


for _query in (*QUERIES, *JOB_QUERIES):
    app.query(_query)(_handler(_query))
