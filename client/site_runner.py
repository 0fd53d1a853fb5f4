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

For dropout drills, ``--drill-crash-on MESSAGE_TYPE`` ends the whole process (SuperNode
included), unanswered, when a message of that type arrives: a real crash at a chosen point
of a job, so a federation's recovery can be rehearsed and tested.

It also shortens Flower's waits (see FLOWER.md): the SuperNode's 3 s idle sleep becomes
``IDLE_POLL`` and its 0.5 s reply wait ``REPLY_POLL`` (module ``time`` of
``flwr.supernode.start_client_internal`` is replaced by a capped shim), and object pulls
back off from 0.02 s instead of 1 s.

All of this reaches into Flower internals, listed once in :data:`fedmte.flower_pin.INTERNALS`;
:func:`fedmte.flower_pin.check_flwr_internals` refuses to start on any other flwr version or
when one of them moved.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sys
import threading
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmte.flower_pin import check_flwr_internals, installed_fab_hash, tune_pull_backoff

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
    """What the runner did with one task (appended to the decision log as JSON)."""

    time: float
    run_id: int
    fab_hash: str
    message_type: str
    accepted: bool
    reason: str = ""
    seconds: float = 0.0


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
    _stop: threading.Event = field(default_factory=threading.Event)

    def _client(self, token: str | None) -> Any:
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
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
        while not self._stop.is_set():
            try:
                response = acquirer.AcquireTask(request)
            except Exception:  # noqa: BLE001 - the local API may be starting or stopping
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
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

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
                push_message(client, reply, context)
                push_task_output(client, context, SubStatus.FAILED, reason)
                decision.seconds = time.perf_counter() - start
                self._record(decision)
                return decision
            if self.client_app is None:
                from fedmte.client.flower_app import app as site_app

                self.client_app = site_app
            try:
                reply = self.client_app(message=message, context=context)
                status, details = SubStatus.COMPLETED, ""
            except Exception as error:  # noqa: BLE001 - every failure becomes an error reply
                details = f"{type(error).__name__}: {error}"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
                status = SubStatus.FAILED
            push_message(client, reply, context)
            push_task_output(client, context, status, details)
            decision.seconds = time.perf_counter() - start
            self._record(decision)
            return decision
        finally:
            done.set()
            client.close()

    def _crash(self, decision: Decision) -> None:
        """Dropout drill: record the crash, then end the whole site process at once, unanswered."""
        decision.accepted = False
        decision.reason = f"drill: the site crashed on receiving {decision.message_type} (--drill-crash-on)"
        self._record(decision)
        print(f"fedmte site runner: {decision.reason}", file=sys.stderr, flush=True)
        os._exit(DRILL_EXIT_CODE)

    def _record(self, decision: Decision) -> None:
        if self.decision_log is not None:
            self.decision_log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.decision_log, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(decision.__dict__, sort_keys=True) + "\n")


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
    if any(arg == "--isolation" or arg.startswith("--isolation=") for arg in rest):
        parser.error("the site runner sets --isolation process itself")
    for fab_hash in args.allow_fab:
        if len(fab_hash) != 64 or any(c not in "0123456789abcdef" for c in fab_hash):
            parser.error(f"--allow-fab takes a 64-digit lowercase hex sha256, got {fab_hash!r}")
    return args, rest


def main(argv: Sequence[str] | None = None) -> None:
    """Start the SuperNode (main thread) and the runner (background thread)."""
    args, rest = _parse(sys.argv[1:] if argv is None else argv)
    check_flwr_internals()
    shim = tune_supernode()
    allowlist = frozenset({installed_fab_hash(), *args.allow_fab})
    from fedmte.client.flower_app import app as site_app  # imported now, not during the first round
    from fedmte.client.site_agent import close_agents, keep_agents_open

    keep_agents_open()  # one process answers every message: keep models and the audit log open

    runner = SiteRunner(f"{args.host}:{args.port}", allowlist, decision_log=args.decision_log,
                        on_activity=shim.mark_active, client_app=site_app, crash_on=frozenset(args.drill_crash_on))
    threading.Thread(target=runner.run_forever, daemon=True, name="fedmte-site-runner").start()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *rest, "--host", args.host, "--port", str(args.port), "--isolation", "process"]
    try:
        flower_supernode()
    finally:
        runner.stop()
        close_agents()


if __name__ == "__main__":
    main()
