"""Finding 3: any local process could claim a site's tasks on the SuperNode's Runtime API.

The site runner's SuperNode serves its local Runtime API on a TCP port of 127.0.0.1. Before,
any process on the machine could poll ``AcquireTask`` there, win the race for the next task,
read the job and answer in the site's name, with no audit record and without the site's
allowlist, policy or privacy layer ever running. Now the runner starts the SuperNode with
Flower's SuperExec authentication and a random secret only its memory holds, and a guard on
the SuperNode's send path lets only the runner's own replies leave.

* ``test_a_foreign_process_gets_no_task_while_the_job_completes`` (slow: real SuperLink and
  SuperNode processes): a separate local process polls ``AcquireTask`` on the site's runtime
  port all through a job, unauthenticated and with a guessed secret; every call is refused
  with Flower's authentication error (HTTP 401) and no task or token, while the job finishes with the
  site's answers, the runner's decision log holds no alert and the audit log verifies.
* The guard, in the fast lane: a reply the runner did not push (to a message it never
  claimed, or a substitute for its own) is dropped unsent and alerted; a message the runner
  does not claim in time is alerted; the runner's own reply passes. Alerts reach the decision
  log and the site's audit log as ``abort`` records.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedmte.client import site_runner
from fedmte.client.audit_log import read_records
from fedmte.client.site_runner import (
    ALERT_FOREIGN_REPLY,
    ALERT_UNCLAIMED_TASK,
    ClaimBook,
    ForeignReplyError,
    SiteRunner,
    guard_supernode,
    secret_pipe,
)
from fedmte.protocol.audit_format import AbortRecord

# --------------------------------------------------------------------------- the guard (fast)


class Alerts:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str, str]] = []

    def __call__(self, kind: str, run_id: int, message_id: str, reason: str) -> None:
        self.seen.append((kind, run_id, message_id, reason))


def reply(message_id: str, reply_to: str, run_id: int = 7) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(message_id=message_id, reply_to_message_id=reply_to,
                                                    run_id=run_id))


def test_only_the_runners_own_reply_to_a_message_it_claimed_passes() -> None:
    alerts = Alerts()
    book = ClaimBook(alerts)
    book.arrived("m1", 7)
    book.claimed("m1")
    book.answering("m1", "r1")
    book.check_reply(7, "r1", "m1")  # the runner's own: passes
    assert alerts.seen == []
    with pytest.raises(ForeignReplyError, match="never claimed"):
        book.check_reply(7, "r1", "m1")  # the same reply again: that message is done
    book.arrived("m2", 7)
    book.claimed("m2")
    book.answering("m2", "r2")
    with pytest.raises(ForeignReplyError, match="not the one the site runner pushed"):
        book.check_reply(7, "forged", "m2")  # another process pushed a reply of its own first
    with pytest.raises(ForeignReplyError, match="never claimed"):
        book.check_reply(7, "r3", "m3")  # a message another process claimed and answered
    assert [kind for kind, *_ in alerts.seen] == [ALERT_FOREIGN_REPLY] * 3
    assert [message for _, _, message, _ in alerts.seen] == ["m1", "m2", "m3"]


def test_a_message_the_runner_does_not_claim_in_time_is_an_alert() -> None:
    alerts = Alerts()
    book = ClaimBook(alerts, claim_alert_after=0.05)
    book.arrived("taken", 9)  # another process claims it: the runner never does
    timer = book.waiting()
    assert timer is not None
    timer.join(2)
    assert [(kind, run, message) for kind, run, message, _ in alerts.seen] == [(ALERT_UNCLAIMED_TASK, 9, "taken")]
    book.arrived("mine", 9)
    timer = book.waiting()
    book.claimed("mine")  # the runner claims it in time
    timer.join(2)
    assert len(alerts.seen) == 1
    book.arrived("ignored", 9)
    book.dropped()  # the SuperNode queued no task for it (run not running): nothing to wait for
    assert book.waiting() is None


def test_the_guard_wraps_the_supernode_loop_so_a_foreign_reply_is_never_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal as loop

    sent: list[str] = []
    replies: list[SimpleNamespace] = []

    def fake_pull(*, receive, **_: object) -> int | None:
        received = receive()
        return None if received is None else received[0].metadata.run_id

    def fake_push(*, send, **_: object) -> None:
        for message in replies:
            try:
                send(message, None, 0.0)
            except Exception:  # noqa: BLE001 - as flwr's loop does: log, then delete the message
                pass

    monkeypatch.setattr(loop, "_pull_and_store_message", fake_pull)
    monkeypatch.setattr(loop, "_push_messages", fake_push)
    alerts = Alerts()
    book = ClaimBook(alerts)
    guard_supernode(book)
    guard_supernode(book)  # idempotent
    incoming = SimpleNamespace(metadata=SimpleNamespace(message_id="m1", run_id=5, reply_to_message_id=""))
    assert loop._pull_and_store_message(receive=lambda: (incoming, None), state=None) == 5
    book.claimed("m1")
    book.answering("m1", "r1")
    replies[:] = [reply("evil", "m1", 5), reply("r1", "m1", 5)]
    loop._push_messages(send=lambda message, *rest: sent.append(message.metadata.message_id), state=None)
    assert sent == ["r1"]
    assert [kind for kind, *_ in alerts.seen] == [ALERT_FOREIGN_REPLY]


def test_an_alert_is_a_decision_line_and_an_audit_record(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedmte.client import site_agent
    from fedmte.client.audit_log import verify
    from fedmte.trial.local_sites import write_site

    site_file = write_site(tmp_path / "site", "site0", {"features": np.ones((4, 2)), "labels": np.arange(4) % 2},
                           ["a", "b"], coordinator=Ed25519PrivateKey.generate(), dp=False)
    runner = SiteRunner("127.0.0.1:1", frozenset(), decision_log=tmp_path / "decisions.jsonl", site_file=site_file)
    runner.alert(ALERT_FOREIGN_REPLY, 42, "m1", "a reply pushed by another process; it was not sent")
    site_agent.close_agents()
    [line] = [json.loads(text) for text in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    assert line["alert"] == ALERT_FOREIGN_REPLY and line["run_id"] == 42 and not line["accepted"]
    [record] = [r for r in read_records(site_file.parent / "audit") if isinstance(r, AbortRecord)]
    assert record.reason_code == ALERT_FOREIGN_REPLY and record.run_id == "42" and "another process" in record.detail
    assert verify(site_file.parent / "audit").ok


def test_the_secret_travels_through_a_pipe_and_the_runner_refuses_to_be_given_one() -> None:
    path, fd = secret_pipe(b"\x00\xffsecret")
    try:
        assert Path(path).read_bytes() == b"\x00\xffsecret"
    finally:
        import os

        os.close(fd)
    for option in (["--superexec-auth-secret-file", "/tmp/s"], ["--superexec-auth-secret-file=/tmp/s"],
                   ["--isolation", "subprocess"]):
        with pytest.raises(SystemExit):
            site_runner._parse(["--superlink", "127.0.0.1:9092", *option])


# --------------------------------------------------------------------------- real processes (slow)

PROBE = r'''
import json, sys, time
from pathlib import Path
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient

address, out, stop = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
def client(secret):
    interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    if secret is not None:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret,
                                                         protected_methods=["/flwr.proto.Runtime/AcquireTask"]))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors)
clients = {"unauthenticated": client(None), "guessed secret": client(b"guess" * 8)}
request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
attempts = []
while not stop.exists():
    for name, c in clients.items():
        try:
            response = c.AcquireTask(request)
            attempts.append({"as": name, "task": response.HasField("task"), "token": bool(response.token)})
        except Exception as error:
            attempts.append({"as": name, "error": f"{type(error).__name__}: {error}"})
    time.sleep(0.005)
out.write_text(json.dumps(attempts))
'''


@pytest.mark.slow  # starts a SuperLink, a site runner and a job
def test_a_foreign_process_gets_no_task_while_the_job_completes(tmp_path: Path) -> None:
    from fedmte.server.coordinator import launch
    from fedmte.server.job import job_from_dict
    from fedmte.server.report import read_report
    from fedmte.trial.local_federation import down, up
    from tests.datasets import DATASETS

    data = DATASETS["basic"]
    npz = tmp_path / "site0.npz"
    np.savez(npz, features=data.features, labels=data.labels, source_probs=data.source_probs)
    state = up(tmp_path / "local", 1, data=[npz], runner="site", dp=False)
    probe = None
    try:
        site = state.sites[0]
        out, stop = tmp_path / "probe.json", tmp_path / "probe.stop"
        probe = subprocess.Popen([sys.executable, "-c", PROBE, f"127.0.0.1:{site.runtime_port}", str(out), str(stop)])
        time.sleep(1.0)  # the probe is polling before the first task exists
        job = job_from_dict({
            "connection": state.connection, "output": str(tmp_path / "out"), "labels": list(state.labels),
            "purpose": "runner api test", "candidates": [{"name": "site-features", "site_features": True}],
            "scorers": ["hscore", "leep"], "privacy": {"dp": False},
            "federation": {"flwr_home": state.flwr_home, "coordinator_key": state.coordinator_key, "min_sites": 1,
                           "round_timeout": 90, "run_timeout": 300},
        })
        status = launch(job)
        stop.touch()
        probe.wait(30)
        assert status.status == "finished" and status.sites == 1, status
        report = read_report(tmp_path / "out" / "report.json")
        assert [s.name for s in report.sites] == ["site0"]

        attempts = json.loads(out.read_text())
        assert len(attempts) >= 50, len(attempts)  # it kept trying all through the job
        assert {a["as"] for a in attempts} == {"unauthenticated", "guessed secret"}
        assert not [a for a in attempts if "error" not in a], "a foreign process got an answer from AcquireTask"
        assert all("401 Unauthorized" in a["error"] for a in attempts), attempts[:3]  # Flower's auth failure

        home = Path(site.site_file).parent
        decisions = [json.loads(line) for line in (home / "decisions.jsonl").read_text().splitlines()]
        assert decisions and all(d["accepted"] and not d.get("alert") for d in decisions), decisions
        assert not [r for r in read_records(home / "audit") if isinstance(r, AbortRecord)]
        from typer.testing import CliRunner

        from fedmte.cli import app

        verified = CliRunner().invoke(app, ["audit", "verify", "--site", str(site.site_file)])
        assert verified.exit_code == 0 and "intact" in verified.output, verified.output
        print(f"\nforeign AcquireTask calls during the job: {len(attempts)}, all refused; "
              f"the site answered {len(decisions)} message(s)")
    finally:
        if probe is not None and probe.poll() is None:
            probe.kill()
        down(Path(state.directory))
