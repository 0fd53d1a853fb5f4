"""The site-owned runner: a SuperNode that executes only the fedmte code the site installed.

A stock ``flower-supernode`` installs whatever Flower app bundle (FAB) the coordinator
submitted and imports the ClientApp it names, so the coordinator decides what code runs at
the site. This runner closes that door. ``python -m fedmte.client.site_runner
<flower-supernode options> [--allow-fab SHA256]...`` starts, in one process:

* Flower's SuperNode (``flower_supernode()``, flwr 1.42.0) with ``--isolation process``, so
  it starts no executor of its own and only queues each message as a task on its local
  Runtime API;
* a runner thread that claims those tasks (``AcquireTask``), pulls the message, context,
  run and FAB as bytes, and checks that ``sha256(fab) == run.fab_hash`` and that the hash
  is on the site's allowlist: by default only the hash of the fedmte bundle built from the
  site's own installed copy (``fedmte/fab``), plus any ``--allow-fab`` hashes. A FAB
  that fails is never unpacked, installed or imported: the runner replies
  ``Error(INVALID_FAB, "refused by site ...")`` and marks the task failed, so the
  coordinator sees the refusal. An accepted message goes to the site's own
  :data:`fedmte.client.flower_app.app` object, never to the FAB's ``clientapp`` reference.

The local Runtime API is closed to other processes. It is a TCP port on 127.0.0.1 on which
any local process could claim the site's next task and answer it in the site's name,
bypassing the allowlist, the policy, the privacy layer and the audit log. The runner starts
the SuperNode with Flower's SuperExec authentication (``--superexec-auth-secret-file``) and a
fresh 32-byte random secret handed over through a pipe, never written to disk, and signs its
own ``AcquireTask`` calls with it (an HMAC over the method, a timestamp, a nonce and the
body); every other Runtime call needs the task token only ``AcquireTask`` hands out. A
foreign ``AcquireTask`` gets an authentication error and no task. Behind that, a guard on the
SuperNode's send path (:class:`ClaimBook`) lets a reply leave only when it is the one the
runner pushed to a message the runner claimed: any other reply is dropped unsent, and a
message the runner has not claimed ``CLAIM_ALERT_AFTER`` seconds after it was queued is
reported. Each such alert is a line in the decision log (its ``alert`` field) and an
``abort`` record (``reason_code`` ``alert:...``) in the site's audit log.

For dropout drills, ``--drill-crash-on MESSAGE_TYPE`` ends the whole process (SuperNode
included), unanswered, when a message of that type arrives: a real crash at a chosen point
of a job, so a federation's recovery can be rehearsed and tested.

It also shortens Flower's waits (see FLOWER.md): the SuperNode's 3 s idle sleep becomes
``IDLE_POLL`` and its 0.5 s reply wait ``REPLY_POLL`` (module ``time`` of
``flwr.supernode.start_client_internal`` is replaced by a capped shim), and object pulls
back off from 0.02 s instead of 1 s.

Before it answers anything, the runner reads the site file its ``--node-config`` names
(``site-file="/path/site.toml"``) and, when the site's ``[limits]`` set
``max_address_space_bytes``, limits the whole process's address space to it
(``RLIMIT_AS``, soft and hard, so it cannot be raised again): a model that gets past every
size check still cannot take more memory than the data owner allowed, and an allocation
beyond it fails as an error instead of pushing the machine into swap or the OOM killer.
The limit caps *virtual* memory, and torch needs headroom: ``import torch`` maps about
1 GiB before any model runs, every thread reserves a stack and glibc up to 64 MiB of malloc
arena per thread (``MALLOC_ARENA_MAX=2`` keeps that small), CUDA maps far more; leave at
least 4 GiB above what the site's models need (see :mod:`fedmte.client.limits`).

All of this reaches into Flower internals, listed once in :data:`fedmte.flower_pin.INTERNALS`;
:func:`fedmte.flower_pin.check_flwr_internals` refuses to start on any other flwr version or
when one of them moved.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import hmac
import json
import os
import re
import resource
import secrets
import sys
import threading
import time
import tomllib
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmte.client.errors import reply_text
from fedmte.flower_pin import RUNTIME_ACQUIRE_TASK, check_flwr_internals, installed_fab_hash, tune_pull_backoff

IDLE_POLL = 0.05
IDLE_POLL_MAX = 1.0
IDLE_GROWTH = 1.25
"""The SuperNode's wait before asking the SuperLink again when no message waited (stock: 3 s):
``IDLE_POLL`` right after a message, growing by ``IDLE_GROWTH`` per empty poll to ``IDLE_POLL_MAX``."""
REPLY_POLL = 0.02
"""Seconds between checks for the ClientApp's reply inside the SuperNode (stock: 0.5)."""
TASK_POLL = 0.01
TASK_POLL_MAX = 0.5
"""Seconds between ``AcquireTask`` calls of the runner on its local Runtime API: ``TASK_POLL``
after a task, growing by ``IDLE_GROWTH`` per empty poll to ``TASK_POLL_MAX``."""
PULL_INITIAL_BACKOFF = 0.02
PULL_BACKOFF_CAP = 0.5
DRILL_EXIT_CODE = 75
"""Exit status of a site process ended by ``--drill-crash-on``."""
HEARTBEAT_EVERY = 15.0
"""Seconds between task heartbeats while a message is being answered (Flower expects one per 30 s)."""
SECRET_BYTES = 32
"""Length of the Runtime API secret the runner makes for its SuperNode at every start."""
CLAIM_ALERT_AFTER = 30.0
"""Seconds a message may wait in the SuperNode for the runner to claim it before that is an alert."""
ALERT_FOREIGN_REPLY = "alert:foreign_reply"
ALERT_UNCLAIMED_TASK = "alert:unclaimed_task"


class _CappedTime(types.SimpleNamespace):
    """The ``time`` module as seen by the SuperNode loop, with its sleeps shortened.

    Idle polls of the SuperLink start at ``IDLE_POLL`` after activity and grow by
    ``IDLE_GROWTH`` up to ``IDLE_POLL_MAX``, so a site answers the next round of a running
    job at once but does not hammer the SuperLink while no job runs.
    """

    def __init__(self, idle: float, reply: float) -> None:
        super().__init__()
        self._idle_min = idle
        self._idle = idle
        self._reply = reply

    def mark_active(self) -> None:
        self._idle = self._idle_min

    def sleep(self, seconds: float) -> None:
        if seconds >= 1:  # the 3 s sleep after a poll that found no message
            time.sleep(self._idle)
            self._idle = min(self._idle * IDLE_GROWTH, IDLE_POLL_MAX)
        else:
            time.sleep(min(seconds, self._reply))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def tune_supernode(idle: float = IDLE_POLL, reply: float = REPLY_POLL) -> _CappedTime:
    """Shorten the SuperNode's polling sleeps and the object-pull backoff in this process."""
    from flwr.supernode import start_client_internal

    shim = _CappedTime(idle, reply)
    start_client_internal.time = shim  # type: ignore[assignment]
    tune_pull_backoff(PULL_INITIAL_BACKOFF, PULL_BACKOFF_CAP)
    return shim


@dataclass
class Decision:
    """What the runner did with one task (appended to the decision log as JSON); a line with
    an ``alert`` reports a task or reply the runner did not handle itself."""

    time: float
    run_id: int
    fab_hash: str
    message_type: str
    accepted: bool
    reason: str = ""
    seconds: float = 0.0
    alert: str = ""
    message_id: str = ""


class ForeignReplyError(RuntimeError):
    """A reply the site runner did not push was about to leave; it is dropped instead."""


class ClaimBook:
    """Which messages the runner claimed and which reply it pushed to each, shared by the
    runner thread and the SuperNode loop of one process, so that a reply leaves only when the
    runner made it.

    The SuperNode loop calls :meth:`arrived` for each message it queues as a task,
    :meth:`waiting` when it starts waiting for the reply, and :meth:`check_reply` before it
    sends one; the runner calls :meth:`claimed` once it holds a task's message and
    :meth:`answering` before it pushes the reply. Anything else goes to ``alert(kind, run_id,
    message_id, reason)``.
    """

    def __init__(self, alert: Callable[[str, int, str, str], None], claim_alert_after: float = CLAIM_ALERT_AFTER,
                 keep: int = 4096) -> None:
        self._alert = alert
        self.claim_alert_after = claim_alert_after
        self._keep = keep
        self._lock = threading.Lock()
        self._arrived: dict[str, int] = {}  # message id -> run id: queued, not yet claimed by the runner
        self._claimed: dict[str, str] = {}  # message id -> the reply id the runner pushed ("" until it does)
        self._reported: set[str] = set()
        self._last: tuple[str, int] | None = None

    @staticmethod
    def _trim(table: dict[str, Any], keep: int) -> None:
        while len(table) > keep:
            table.pop(next(iter(table)))

    def arrived(self, message_id: str, run_id: int) -> None:
        with self._lock:
            self._arrived[message_id] = run_id
            self._last = (message_id, run_id)
            self._trim(self._arrived, self._keep)

    def dropped(self) -> None:
        """The SuperNode queued no task for the last message after all (its run is not running,
        or pulling its content failed)."""
        with self._lock:
            if self._last is not None:
                self._arrived.pop(self._last[0], None)
            self._last = None

    def claimed(self, message_id: str) -> None:
        with self._lock:
            self._arrived.pop(message_id, None)
            self._claimed.setdefault(message_id, "")
            self._trim(self._claimed, self._keep)

    def answering(self, message_id: str, reply_id: str) -> None:
        with self._lock:
            self._claimed[message_id] = reply_id

    def waiting(self) -> threading.Timer | None:
        """Start the claim deadline of the message just queued (cancel it once the loop
        stops waiting for its reply)."""
        with self._lock:
            last, self._last = self._last, None
        if last is None:
            return None
        message_id, run_id = last

        def overdue() -> None:
            with self._lock:
                if message_id in self._claimed or message_id not in self._arrived or message_id in self._reported:
                    return
                self._reported.add(message_id)
            self._alert(ALERT_UNCLAIMED_TASK, run_id, message_id,
                        f"message {message_id[:16]}... of run {run_id} was queued as a task {self.claim_alert_after:g} s "
                        "ago and the site runner has not claimed it: another local process may have taken it from "
                        "the Runtime API")

        timer = threading.Timer(self.claim_alert_after, overdue)
        timer.daemon = True
        timer.start()
        return timer

    def check_reply(self, run_id: int, message_id: str, reply_to: str) -> None:
        """Return if this is the reply the runner pushed to a message it claimed; otherwise
        alert and raise :class:`ForeignReplyError`, so the reply is never sent."""
        with self._lock:
            expected = self._claimed.get(reply_to)
            if expected is not None and expected == message_id:
                del self._claimed[reply_to]
                return
            self._arrived.pop(reply_to, None)
            self._reported.add(reply_to)
        if expected is None:
            reason = (f"a reply to message {reply_to[:16]}... of run {run_id}, which the site runner never claimed, "
                      "was pushed by another process on the Runtime API; it was not sent")
        else:
            reason = (f"reply {message_id[:16]}... to message {reply_to[:16]}... of run {run_id} is not the one the "
                      "site runner pushed; it was not sent")
        self._alert(ALERT_FOREIGN_REPLY, run_id, reply_to, reason)
        raise ForeignReplyError(reason)


def guard_supernode(book: ClaimBook) -> None:
    """Route this process's SuperNode loop through ``book``: note each message queued as a
    task, time its claim, and send only the runner's own replies."""
    from flwr.supernode import start_client_internal as loop

    pull, push = loop._pull_and_store_message, loop._push_messages
    if getattr(push, "fedmte_guarded", False):
        return

    @functools.wraps(pull)
    def pull_and_store(*args: Any, **kwargs: Any) -> Any:
        receive = kwargs["receive"]

        def noting_receive() -> Any:
            received = receive()
            if received is not None:
                message = received[0]
                book.arrived(message.metadata.message_id, message.metadata.run_id)
            return received

        kwargs["receive"] = noting_receive
        run_id = pull(*args, **kwargs)
        if run_id is None:
            book.dropped()
        return run_id

    @functools.wraps(push)
    def push_messages(*args: Any, **kwargs: Any) -> Any:
        send = kwargs["send"]

        def guarded_send(message: Any, *rest: Any) -> Any:
            book.check_reply(message.metadata.run_id, message.metadata.message_id,
                             message.metadata.reply_to_message_id)
            return send(message, *rest)

        kwargs["send"] = guarded_send
        timer = book.waiting()
        try:
            return push(*args, **kwargs)
        finally:
            if timer is not None:
                timer.cancel()

    push_messages.fedmte_guarded = True  # type: ignore[attr-defined]
    loop._pull_and_store_message = pull_and_store  # type: ignore[assignment]
    loop._push_messages = push_messages  # type: ignore[assignment]


def secret_pipe(secret: bytes) -> tuple[str, int]:
    """A path Flower reads ``secret`` from, once (``/dev/fd/N`` of a pipe), and the fd to close."""
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, secret)
    finally:
        os.close(write_fd)
    return f"/dev/fd/{read_fd}", read_fd


@dataclass
class SiteRunner:
    """Claims ClientApp tasks from the local Runtime API and answers or refuses each one."""

    runtime_address: str
    allowlist: frozenset[str]
    decision_log: Path | None = None
    poll: float = TASK_POLL
    on_activity: Any = None
    client_app: Any = None
    crash_on: frozenset[str] = frozenset()
    secret: bytes | None = None
    """The SuperNode's Runtime API secret: ``AcquireTask`` calls are signed with it."""
    site_file: Path | None = None
    """The site file (``--node-config site-file=...``) whose audit log receives the alerts."""
    book: ClaimBook | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _record_lock: threading.Lock = field(default_factory=threading.Lock)

    def _client(self, token: str | None) -> Any:
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
            SuperExecAuthHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        elif self.secret is not None:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=self.secret,
                                                             protected_methods=(RUNTIME_ACQUIRE_TASK,)))
        return RuntimeHttpClient.from_server_address(
            server_address=self.runtime_address, insecure=True, root_certificates=None,
            interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker(),
        )

    def run_forever(self) -> None:
        """Poll for tasks until :meth:`stop`; survive a Runtime API that is not up yet."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        acquirer = self._client(None)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        wait = self.poll
        failures = 0
        while not self._stop.is_set():
            try:
                response = acquirer.AcquireTask(request)
                failures = 0
            except Exception as error:  # noqa: BLE001 - the local API may be starting or stopping
                failures += 1
                if failures == 50:  # ten seconds of refusals: say why instead of polling in silence
                    print(f"fedmte site runner: the Runtime API keeps refusing AcquireTask: {error!r}",
                          file=sys.stderr, flush=True)
                self._stop.wait(0.2)
                continue
            if response.HasField("task") and response.token:
                try:
                    self.handle(response.token)
                except Exception as error:  # noqa: BLE001 - one broken task must not stop the site
                    print(f"fedmte site runner: task failed before a reply could be sent: {error!r}",
                          file=sys.stderr, flush=True)
                if self.on_activity is not None:
                    self.on_activity()
                wait = self.poll
                continue
            self._stop.wait(wait)
            wait = min(wait * IDLE_GROWTH, TASK_POLL_MAX)

    def stop(self) -> None:
        self._stop.set()

    def handle(self, token: str) -> Decision:
        """Answer one claimed task, or refuse it when its FAB is not allowed."""
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_task_output

        start = time.perf_counter()
        client = self._client(token)
        done = threading.Event()

        def heartbeat() -> None:
            while not done.wait(HEARTBEAT_EVERY):
                try:
                    client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
                except Exception:  # noqa: BLE001 - a missed heartbeat only risks the task expiring
                    pass

        beat = threading.Thread(target=heartbeat, daemon=True, name="fedmte-task-heartbeat")
        beat.start()
        try:
            message, context, run, fab = pull_task_input(client)
            if self.book is not None:
                self.book.claimed(message.metadata.message_id)
            actual = hashlib.sha256(fab.content).hexdigest()
            message_type = message.metadata.message_type
            if not hmac.compare_digest(actual, run.fab_hash):
                reason = f"refused by site: the FAB's content hashes to {actual}, not the run's fab_hash {run.fab_hash}"
            elif actual not in self.allowlist:
                reason = (f"refused by site: FAB sha256 {actual} is not on this site's allowlist "
                          f"({len(self.allowlist)} hash(es)); the site runs only the fedmte release it installed")
            else:
                reason = ""
            decision = Decision(time.time(), run.run_id, actual, message_type, accepted=not reason, reason=reason)
            if message_type in self.crash_on:
                self._crash(decision)
            if reason:
                reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=reason), reply_to=message)
                self._push(client, message, reply, context)
                push_task_output(client, context, SubStatus.FAILED, reason)
                decision.seconds = time.perf_counter() - start
                self._record(decision)
                return decision
            if self.client_app is None:
                from fedmte.client.flower_app import app as site_app

                self.client_app = site_app
            from fedmte.client import site_agent

            site_file = context.node_config.get(site_agent.SITE_FILE_KEY)
            if isinstance(site_file, str) and site_file:  # "sent" goes to the audit log once the push succeeded
                site_agent.hold_outcomes(site_file)
            try:
                reply = self.client_app(message=message, context=context)
                status, details = SubStatus.COMPLETED, ""
            except Exception as error:  # noqa: BLE001 - every failure becomes an error reply
                details = reply_text(error)
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
                status = SubStatus.FAILED
            try:
                self._push(client, message, reply, context)
            except BaseException as error:
                if isinstance(site_file, str) and site_file:
                    site_agent.settle_outcomes(site_file, delivered=False, detail=reply_text(error))
                raise
            if isinstance(site_file, str) and site_file:
                site_agent.settle_outcomes(site_file, delivered=True)
            push_task_output(client, context, status, details)
            decision.seconds = time.perf_counter() - start
            self._record(decision)
            return decision
        finally:
            done.set()
            client.close()

    def _push(self, client: Any, message: Any, reply: Any, context: Any) -> None:
        """Push ``reply`` to ``message``, after telling the claim book which reply is the runner's."""
        from flwr.supernode.runtime.run_clientapp import push_message

        if self.book is not None:
            self.book.answering(message.metadata.message_id, reply.object_id)
        push_message(client, reply, context)

    def alert(self, kind: str, run_id: int, message_id: str, reason: str) -> None:
        """A task or reply the runner did not handle itself: a decision-log line, stderr and an
        ``abort`` record in the site's audit log."""
        self._record(Decision(time.time(), run_id, "", "", accepted=False, reason=reason, alert=kind,
                              message_id=message_id))
        print(f"fedmte site runner: ALERT {kind}: {reason}", file=sys.stderr, flush=True)
        if self.site_file is None:
            return
        try:
            from fedmte.client.site_agent import agent_for

            agent = agent_for(self.site_file)
            with agent.lock:
                agent.privacy.log.abort(run_id=str(run_id)[:64], reason_code=kind, detail=reason)
        except Exception as error:  # noqa: BLE001 - the decision log and stderr have it already
            print(f"fedmte site runner: the alert could not be written to the audit log: {error!r}",
                  file=sys.stderr, flush=True)

    def _crash(self, decision: Decision) -> None:
        """Dropout drill: record the crash, then end the whole site process at once, unanswered."""
        decision.accepted = False
        decision.reason = f"drill: the site crashed on receiving {decision.message_type} (--drill-crash-on)"
        self._record(decision)
        print(f"fedmte site runner: {decision.reason}", file=sys.stderr, flush=True)
        os._exit(DRILL_EXIT_CODE)

    def _record(self, decision: Decision) -> None:
        if self.decision_log is not None:
            with self._record_lock:  # the runner thread and the SuperNode loop's alerts
                self.decision_log.parent.mkdir(parents=True, exist_ok=True)
                with open(self.decision_log, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(decision.__dict__, sort_keys=True) + "\n")


SITE_FILE_KEY = "site-file"
"""The node-config key naming the site file (:data:`fedmte.client.site_agent.SITE_FILE_KEY`,
repeated here so the runner can read it before importing the agent)."""
_CONFIG_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")
"""A ``key=value`` pair of ``--node-config`` as Flower parses it (flwr.common.config.parse_config_args)."""


def node_config_site_file(args: Sequence[str]) -> Path | None:
    """The site file named by ``--node-config`` in flower-supernode's arguments, if any."""
    values: list[str] = []
    items = iter(args)
    for arg in items:
        if arg == "--node-config":
            values.append(next(items, ""))
        elif arg.startswith("--node-config="):
            values.append(arg.split("=", 1)[1])
    found: object = None
    for value in values:
        if value.endswith(".toml"):  # Flower also takes the node config as a TOML file
            try:
                with open(Path(value).expanduser(), "rb") as handle:
                    found = tomllib.load(handle).get(SITE_FILE_KEY, found)
            except (OSError, tomllib.TOMLDecodeError):
                pass
            continue
        for key, raw in _CONFIG_PAIR.findall(value):
            if key == SITE_FILE_KEY:
                try:
                    found = tomllib.loads(f"value = {raw}")["value"]
                except tomllib.TOMLDecodeError:
                    found = raw
    return Path(found) if isinstance(found, str) and found else None


def limit_address_space(max_bytes: int) -> int:
    """Set this process's ``RLIMIT_AS`` (soft and hard) to ``max_bytes``, or to the hard
    limit already in force if that is lower; return the limit now in force."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    target = max_bytes if hard == resource.RLIM_INFINITY else min(max_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (target, target))
    return target


def apply_site_limits(supernode_args: Sequence[str]) -> int | None:
    """Apply the ``[limits]`` of the site file named in ``supernode_args`` to this process:
    the address-space limit when ``max_address_space_bytes`` is set. Returns the limit set,
    or None. A site file that does not load is reported and left to the site agent, which
    refuses every message until it loads."""
    site_file = node_config_site_file(supernode_args)
    if site_file is None:
        return None
    from fedmte.client.site_config import load_site_config
    from fedmte.protocol.errors import FedmteError

    try:
        limits = load_site_config(site_file).limits
    except FedmteError as error:
        print(f"fedmte site runner: cannot read the limits of {site_file}: {error}", file=sys.stderr, flush=True)
        return None
    if limits.max_address_space_bytes is None:
        return None
    applied = limit_address_space(limits.max_address_space_bytes)
    print(f"fedmte site runner: address space limited to {applied / 1024**3:.1f} GiB "
          "([limits] max_address_space_bytes)", file=sys.stderr, flush=True)
    return applied


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m fedmte.client.site_runner",
        description="A Flower SuperNode that runs only the site's installed fedmte ClientApp. "
        "Every option not listed here goes to flower-supernode.",
    )
    parser.add_argument("--allow-fab", action="append", default=[], metavar="SHA256",
                        help="another FAB hash to accept besides the installed fedmte bundle's")
    parser.add_argument("--decision-log", type=Path, default=None,
                        help="append one JSON line per accepted or refused task to this file")
    parser.add_argument("--drill-crash-on", action="append", default=[], metavar="MESSAGE_TYPE",
                        help="dropout drill: when a message of this type (e.g. query.secure_upload) arrives, "
                        "end the whole site process at once without answering it")
    parser.add_argument("--host", default="127.0.0.1", help="host of the SuperNode's Runtime API")
    parser.add_argument("--port", type=int, default=9094, help="port of the SuperNode's Runtime API")
    args, rest = parser.parse_known_args(list(argv))
    for own in ("--isolation", "--superexec-auth-secret-file"):
        if any(arg == own or arg.startswith(f"{own}=") for arg in rest):
            parser.error(f"the site runner sets {own} itself")
    for fab_hash in args.allow_fab:
        if len(fab_hash) != 64 or any(c not in "0123456789abcdef" for c in fab_hash):
            parser.error(f"--allow-fab takes a 64-digit lowercase hex sha256, got {fab_hash!r}")
    return args, rest


def main(argv: Sequence[str] | None = None) -> None:
    """Start the SuperNode (main thread) and the runner (background thread)."""
    args, rest = _parse(sys.argv[1:] if argv is None else argv)
    apply_site_limits(rest)  # before the site's code runs any model
    check_flwr_internals()
    shim = tune_supernode()
    allowlist = frozenset({installed_fab_hash(), *args.allow_fab})
    from fedmte.client.flower_app import app as site_app  # imported now, not during the first round
    from fedmte.client.site_agent import close_agents, keep_agents_open

    keep_agents_open()  # one process answers every message: keep models and the audit log open

    secret = secrets.token_bytes(SECRET_BYTES)  # this process's only: never on disk, new at every start
    runner = SiteRunner(f"{args.host}:{args.port}", allowlist, decision_log=args.decision_log,
                        on_activity=shim.mark_active, client_app=site_app, crash_on=frozenset(args.drill_crash_on),
                        secret=secret, site_file=node_config_site_file(rest))
    runner.book = ClaimBook(runner.alert)
    guard_supernode(runner.book)
    secret_path, secret_fd = secret_pipe(secret)
    threading.Thread(target=runner.run_forever, daemon=True, name="fedmte-site-runner").start()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *rest, "--host", args.host, "--port", str(args.port), "--isolation", "process",
                "--superexec-auth-secret-file", secret_path]
    try:
        flower_supernode()
    finally:
        runner.stop()
        os.close(secret_fd)
        close_agents()


if __name__ == "__main__":
    main()
