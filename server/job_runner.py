"""The Flower edge of a job on the coordinator's side: submit the run, wait for its status.

:func:`fedmte.server.coordinator.run_job` (``fedmte run JOB.toml``, ``fedmte probe``) submits
the fedmte Flower app (``fedmte/fab``) with ``flwr run <fab> <connection>
--run-config <job>`` (:func:`submit_run`); the ServerApp (:mod:`fedmte.server.flower_app`)
hands the run config's ``job`` to :func:`fedmte.server.coordinator.serve_job`, which writes
``run.json`` (:class:`~fedmte.server.report.RunStatus`) last. :func:`wait_for_status` waits
for that file, checking the run's status with ``flwr ls`` meanwhile, so a run that died
without writing it is an error at once, not at the timeout.

The ServerApp runs on the SuperLink's machine, which is the coordinator's, so the report
and status paths are paths there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedmte.flower_pin import FAB_DIR
from fedmte.protocol.errors import FederationError
from fedmte.server.report import RunStatus, read_status

FLWR_CLI_TIMEOUT = 60.0


# --------------------------------------------------------------------------- coordinator side

def flwr_command() -> str:
    """The ``flwr`` CLI of the running interpreter's environment."""
    candidate = Path(sys.executable).parent / "flwr"
    return str(candidate) if candidate.exists() else "flwr"


def flwr_env(flwr_home: Path | None) -> dict[str, str]:
    """Environment for the ``flwr`` CLI: ``FLWR_HOME`` set, this environment's bin first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def _flwr_json(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    try:
        done = subprocess.run(
            [flwr_command(), *args, "--format", "json"], env=env, capture_output=True, text=True,
            timeout=FLWR_CLI_TIMEOUT, check=False,
        )
    except subprocess.TimeoutExpired:
        raise FederationError(f"`flwr {' '.join(args)}` did not answer within {FLWR_CLI_TIMEOUT:.0f} s") from None
    text = done.stdout.strip()
    start = text.find("{")
    try:
        parsed = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict) or not parsed.get("success", False):
        detail = (parsed or {}).get("error-message") if isinstance(parsed, dict) else None
        raise FederationError(
            f"`flwr {' '.join(args)}` failed (exit {done.returncode}): {detail or (done.stderr or done.stdout).strip()[-800:]}"
        )
    return parsed


def run_status(connection: str, run_id: int, env: dict[str, str]) -> tuple[str, str]:
    """``(status, details)`` of a run, as ``flwr ls`` reports it (e.g. ``finished:completed``)."""
    listing = _flwr_json(["ls", connection, "--run-id", str(run_id)], env)
    for run in listing.get("runs", []):
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status", "")), str(run.get("status-details", "") or "")
    raise FederationError(f"run {run_id} is not listed by the SuperLink of connection {connection!r}")


def submit_run(job_text: str, connection: str, env: dict[str, str], fab_dir: Path = FAB_DIR) -> int:
    """``flwr run <fab> <connection> --run-config`` with ``job = <job_text>``; the run id."""
    with tempfile.TemporaryDirectory(prefix="fedmte-run-") as tmp:
        overrides = Path(tmp) / "run_config.toml"
        overrides.write_text(f"job = {json.dumps(job_text)}\n", encoding="utf-8")
        started = _flwr_json(["run", str(fab_dir), connection, "--run-config", str(overrides)], env)
    return int(started["run-id"])


def wait_for_status(path: Path, run_id: int, connection: str, env: dict[str, str], timeout: float, *,
                    poll: float = 0.1, status_every: float = 3.0) -> RunStatus:
    """Wait until the ServerApp wrote ``path`` (a :class:`~fedmte.server.report.RunStatus`) for ``run_id``.

    Every ``status_every`` seconds ``flwr ls`` is asked too, so a run that ended without
    writing it (killed, or failed before it could) is an error at once, not at the timeout.
    """
    deadline = time.monotonic() + timeout
    next_status = time.monotonic() + status_every
    while True:
        if path.exists():
            report = read_status(path)
            if report.run_id == run_id:
                return report
        if time.monotonic() > next_status:
            status, details = run_status(connection, run_id, env)
            if status.startswith("finished"):
                if path.exists() and read_status(path).run_id == run_id:
                    return read_status(path)
                raise FederationError(f"run {run_id} ended as {status} without a report: {details}")
            next_status = time.monotonic() + status_every
        if time.monotonic() > deadline:
            raise FederationError(f"run {run_id} did not finish within {timeout:.0f} s; stop it with `flwr stop {run_id}`")
        time.sleep(poll)
