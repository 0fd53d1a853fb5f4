"""The production ClientApp, driven in process: what a coordinator's messages reach at a site.

:class:`ClientAppSite` hands each payload, as a Flower ``Message`` with the site's
``--node-config`` in its ``Context``, to :data:`fedmte.client.flower_app.app` (the object the
site runner calls), and turns a raised error into the text the site runner would send back
(:func:`fedmte.client.errors.reply_text`). Every payload crosses the wire form both ways.
Flower needs the task identity of the process set before it builds a Message; the site
runner sets it from the task it claimed, this helper from the message it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmte.client.flower_app import app
from fedmte.client.errors import reply_text
from fedmte.flower_records import payload_from_record, payload_to_record
from fedmte.protocol.wire import MESSAGE_PREFIX, Payload


@dataclass
class Answer:
    """A site's reply: a payload, or the error text the coordinator would read."""

    payload: Payload | None = None
    error: str | None = None


@dataclass
class ClientAppSite:
    site_file: Path
    node_id: int = 1

    def ask(self, query: str, payload: Payload, *, run_id: int) -> Answer:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, self.node_id, 1
        wire = Payload.from_wire(*payload.to_wire())
        message = Message(payload_to_record(wire), dst_node_id=self.node_id, message_type=MESSAGE_PREFIX + query)
        context = Context(run_id=run_id, node_id=self.node_id, node_config={"site-file": str(self.site_file)},
                          state=RecordDict(), run_config={})
        try:
            reply = app(message=message, context=context)
        except Exception as error:  # noqa: BLE001 - the site runner sends every failure back as text
            return Answer(error=reply_text(error))
        received = payload_from_record(reply.content)
        return Answer(payload=Payload.from_wire(*received.to_wire()))
