"""The Flower ClientApp: one handler per fedmte message, each a thin adapter to the site agent.

Every message is a Flower ``query.<name>`` message whose ``RecordDict`` carries a
:class:`~fedmte.protocol.wire.Payload` (:mod:`fedmte.flower_records`). What the site holds
comes from the SuperNode's own ``--node-config 'site-file="/path/site.toml"'``, never from
the coordinator: the site file's :class:`~fedmte.client.site_agent.SiteAgent` answers a job's
``setup``, ``stats`` and ``finish``, and its :class:`~fedmte.client.secure_site.SecureSite`
the five ``secure_*`` steps (which compute through the same agent). An error becomes Flower's
error reply, so the coordinator sees the site's reason.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmte.client import site_agent
from fedmte.client.secure_site import answer_secure, check_plain_statistics_allowed
from fedmte.flower_records import payload_from_record, payload_to_record
from fedmte.protocol.errors import InvalidInputError
from fedmte.protocol.wire import (
    FINISH,
    SECURE_ABORT,
    SECURE_ADVERTISE,
    SECURE_REVEAL,
    SECURE_SHARE,
    SECURE_UPLOAD,
    SETUP,
    STATS,
    Payload,
)

app = ClientApp()


def site_file(context: Context) -> Path:
    """The site file this SuperNode was started with."""
    value = context.node_config.get(site_agent.SITE_FILE_KEY)
    if not isinstance(value, str) or not value:
        raise InvalidInputError(
            f"this SuperNode has no {site_agent.SITE_FILE_KEY!r} in its --node-config; start it with "
            f"--node-config '{site_agent.SITE_FILE_KEY}=\"/path/to/site.toml\"' (fedmte site run does)"
        )
    return Path(value)


def _agent(query: str, msg: Message, context: Context) -> Message:
    reply = site_agent.answer(query, payload_from_record(msg.content), site_file(context), run_id=context.run_id)
    return _reply(reply, msg)


def _secure(query: str, msg: Message, context: Context) -> Message:
    return _reply(answer_secure(query, payload_from_record(msg.content), site_file(context)), msg)


def _reply(payload: Payload, msg: Message) -> Message:
    return Message(payload_to_record(payload), reply_to=msg)


@app.query(SETUP)
def setup(msg: Message, context: Context) -> Message:
    """A job's signed setup: verify the coordinator, the policy and every offered candidate."""
    return _agent(SETUP, msg, context)


@app.query(STATS)
def stats(msg: Message, context: Context) -> Message:
    """A plain statistics round (refused where the site file requires the secure sum)."""
    check_plain_statistics_allowed(site_file(context))
    return _agent(STATS, msg, context)


@app.query(FINISH)
def finish(msg: Message, context: Context) -> Message:
    """The job is over: a signed audit checkpoint back."""
    return _agent(FINISH, msg, context)


@app.query(SECURE_ADVERTISE)
def secure_advertise(msg: Message, context: Context) -> Message:
    return _secure(SECURE_ADVERTISE, msg, context)


@app.query(SECURE_SHARE)
def secure_share(msg: Message, context: Context) -> Message:
    return _secure(SECURE_SHARE, msg, context)


@app.query(SECURE_UPLOAD)
def secure_upload(msg: Message, context: Context) -> Message:
    return _secure(SECURE_UPLOAD, msg, context)


@app.query(SECURE_REVEAL)
def secure_reveal(msg: Message, context: Context) -> Message:
    return _secure(SECURE_REVEAL, msg, context)


@app.query(SECURE_ABORT)
def secure_abort(msg: Message, context: Context) -> Message:
    return _secure(SECURE_ABORT, msg, context)
