"""Scoring jobs over Flower: the ServerApp's driver and the coordinator's launcher.

Two halves meet through Flower's run config (``job``, a JSON document), for two kinds of job:

* a job with candidate models (``"kind": "models"``): :func:`fedmte.server.coordinator.run_job`
  (``fedmte run JOB.toml`` with a :class:`~fedmte.server.job.JobSpec`) submits it, and
  :func:`serve` hands it to :func:`fedmte.server.coordinator.serve_job`; the sites run the
  candidates themselves (``site-file`` sites, :mod:`fedmte.client.site_agent`);
* a job over sites that hold precomputed features (``data-path`` sites): :func:`launch` turns
  a :class:`JobFile` into a :class:`ServerJob`, and :func:`serve` runs
  :func:`fedmte.server.rounds.run_scoring` over a
  :class:`~fedmte.server.flower_exchange.FlowerExchange` and writes a :class:`JobReport`
  (scores, rounds, seconds per round trip) as JSON.

Both submit the fedmte Flower app (``fedmte/server/fab``) with ``flwr run <fab> <connection>
--run-config <job>`` (:func:`submit_run`) and wait for the status file the ServerApp writes,
checking the run's status with ``flwr ls`` meanwhile (:func:`wait_for_status`). A failure is
written too, with each site's reason, and then re-raised so Flower marks the run failed.

A features job can instead probe the sites (``fedmte probe JOB.toml``, :func:`launch` with
``probe=True``): :mod:`fedmte.server.site_probe` over the same exchange, with each site's
answer to each forged request in the report's ``probes``.

The ServerApp runs on the SuperLink's machine, which is the coordinator's, so the report
and transcript paths are paths there.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedmte.protocol.errors import FederationError, FedmteError, InvalidInputError
from fedmte.server.secure_aggregation import SecureAggregator, SecureJobSpec, write_transcript
from fedmte.server.site_probe import ProbeResult, probe_sites

FAB_DIR = Path(__file__).resolve().parent / "fab"
"""The Flower app bundle's source: a pyproject.toml that names fedmte's ServerApp and ClientApp."""

REPORT_SCHEMA = "fedmte.job_report.v1"
FLWR_CLI_TIMEOUT = 60.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerJob(_Strict):
    """What the ServerApp needs to run one scoring job (travels as the run config's ``job``)."""

    scorers: list[str] | None = None
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    num_classes: int = Field(ge=2)
    offset: list[float] | None = None
    min_sites: int = Field(default=1, ge=1)
    connect_timeout: float = Field(default=60.0, gt=0)
    round_timeout: float = Field(default=300.0, gt=0)
    report: str = Field(pattern=r"^/.*\.json$", description="absolute path of the JSON report on the SuperLink's machine")
    secure: SecureJobSpec | None = Field(default=None, description="sum with the secure sum (fedmte.server.secure_aggregation)")
    transcript: str | None = Field(default=None, pattern=r"^/.*\.npz$",
                                   description="secure jobs: write every masked upload the coordinator received here")
    probe: bool = Field(default=False, description="probe the sites (fedmte.server.site_probe) instead of scoring")


class JobFile(_Strict):
    """``JOB.toml``: which scorers, over which Flower connection, and where the report goes.

    Relative paths are taken relative to the job file's directory.
    """

    connection: str = Field(min_length=1, description="a [superlink.NAME] connection in FLWR_HOME/config.toml")
    secure: SecureJobSpec | None = Field(default=None, description="the [secure] table: secure sum on")
    flwr_home: Path | None = Field(default=None, description="the directory holding config.toml (default: $FLWR_HOME)")
    out: Path = Field(description="where the JSON report is written (a .json file)")
    num_classes: int = Field(ge=2)
    scorers: list[str] | None = None
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    offset: list[float] | None = None
    min_sites: int = Field(default=1, ge=1)
    connect_timeout: float = Field(default=60.0, gt=0)
    round_timeout: float = Field(default=300.0, gt=0)
    run_timeout: float = Field(default=1800.0, gt=0)
    transcript: Path | None = Field(
        default=None, description="secure jobs: an .npz on the coordinator's machine recording every masked "
        "upload it received (for auditors: the coordinator holds only masked words)")

    @field_validator("out")
    @classmethod
    def _json_report(cls, value: Path) -> Path:
        if value.suffix != ".json":
            raise ValueError(f"the report is JSON: name a .json file, got {value}")
        return value

    @field_validator("transcript")
    @classmethod
    def _npz_transcript(cls, value: Path | None) -> Path | None:
        if value is not None and value.suffix != ".npz":
            raise ValueError(f"the transcript is an .npz archive: name a .npz file, got {value}")
        return value


class RoundReport(_Strict):
    name: str
    seconds: float
    kinds: list[str] = Field(default_factory=list)
    bytes_per_site: int = 0


class JobReport(_Strict):
    """The outcome of one job: scores, rounds and their times, or the error and each site's reason."""

    schema_: Literal["fedmte.job_report.v1"] = Field(default=REPORT_SCHEMA, alias="schema")
    status: Literal["finished", "failed"]
    run_id: int | None = None
    sites: int = 0
    scorers: list[str] = Field(default_factory=list)
    scores: dict[str, float] = Field(default_factory=dict)
    planned_rounds: int = 0
    rounds: list[RoundReport] = Field(default_factory=list, description="the setup round, then each statistics round")
    seconds_per_round_trip: float | None = Field(default=None, description="mean over the statistics rounds")
    total_seconds: float = 0.0
    error: str | None = None
    failures: dict[str, str] = Field(default_factory=dict)
    secure: dict[str, Any] | None = Field(default=None, description="secure-sum job: sites, threshold, setup and step times")
    probes: list[ProbeResult] | None = Field(default=None, description="a probe run: what each site did with each probe")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def load_job_file(path: Path) -> JobFile:
    """Read and validate ``JOB.toml``; errors name the offending key."""
    if not path.is_file():
        raise InvalidInputError(f"job file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise InvalidInputError(f"job file {path} is not valid TOML: {error}") from None
    try:
        job = JobFile.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in error.errors())
        raise InvalidInputError(f"job file {path}: {problems}") from None
    base = path.resolve().parent
    updates: dict[str, Any] = {"out": base / job.out}
    if job.flwr_home is not None:
        updates["flwr_home"] = base / job.flwr_home
    if job.transcript is not None:
        updates["transcript"] = base / job.transcript
    if job.secure is not None:  # the coordinator's signing key, relative to the job file
        updates["secure"] = job.secure.model_copy(update={"signing_key": base / job.secure.signing_key})
    return job.model_copy(update=updates)


def write_report(report: JobReport, path: Path) -> None:
    """Write atomically (temp file, then rename), so a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False, encoding="utf-8")
    with handle:
        handle.write(report.model_dump_json(by_alias=True, indent=2))
    os.replace(handle.name, path)


def read_report(path: Path) -> JobReport:
    try:
        return JobReport.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError) as error:
        raise FederationError(f"the job report {path} is unreadable: {error}") from None


# --------------------------------------------------------------------------- ServerApp side

def _job_kind(text: str) -> str:
    """``"models"`` for a job with candidate models (:mod:`fedmte.server.coordinator`),
    ``"features"`` for one over sites that hold precomputed features (:class:`ServerJob`)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return "features"
    return "models" if isinstance(doc, dict) and doc.get("kind") == "models" else "features"


def serve(grid: Any, run_config: dict[str, Any], run_id: int) -> JobReport:
    """Run the job in ``run_config['job']`` over ``grid`` and write its report."""
    from fedmte.server.flower_exchange import FlowerExchange, tune_pull_backoff
    from fedmte.server.rounds import run_scoring

    start = time.perf_counter()
    text = run_config.get("job", "")
    if isinstance(text, str) and _job_kind(text) == "models":
        from fedmte.server.coordinator import serve_job

        serve_job(grid, text, run_id)
        return read_report(Path(json.loads(text)["job"]["output"]) / "run.json")
    try:
        job = ServerJob.model_validate_json(text if isinstance(text, str) else "")
    except ValidationError as error:
        raise InvalidInputError(f"the run config's 'job' is not a valid fedmte job: {error}") from None
    report_path = Path(job.report)
    aggregator = None
    try:
        tune_pull_backoff()
        exchange = FlowerExchange(
            grid, min_sites=job.min_sites, connect_timeout=job.connect_timeout, round_timeout=job.round_timeout
        )
        if job.probe:
            return _serve_probe(exchange, job, run_id, start)
        if job.secure is not None:
            aggregator = SecureAggregator.from_spec(job.secure, job_id=f"run-{run_id}-{secrets.token_hex(4)}")
            aggregator.keep_uploads = job.transcript is not None
        outcome = run_scoring(
            exchange,
            scorers=job.scorers,
            num_classes=job.num_classes,
            options=job.options,
            offset=None if job.offset is None else np.asarray(job.offset, dtype=np.float64),
            aggregator=aggregator,
        )
    except FedmteError as error:
        failed = JobReport(
            status="failed", run_id=run_id, error=str(error), total_seconds=time.perf_counter() - start,
            failures=getattr(error, "failures", {}),
            secure=None if aggregator is None else aggregator.summary(),
        )
        write_report(failed, report_path)
        raise
    finally:
        if aggregator is not None and job.transcript is not None:
            write_transcript(aggregator, Path(job.transcript))
    stats_rounds = outcome.timings[1:]
    rounds = [RoundReport(name=outcome.timings[0].name, seconds=outcome.timings[0].seconds)]
    rounds += [
        RoundReport(name=t.name, seconds=t.seconds, kinds=r.kinds, bytes_per_site=r.nbytes)
        for t, r in zip(stats_rounds, outcome.result.rounds)
    ]
    trips = [t.seconds for t in stats_rounds] or [outcome.timings[0].seconds]
    report = JobReport(
        status="finished",
        run_id=run_id,
        sites=outcome.sites,
        scorers=list(outcome.plan.scorers),
        scores=outcome.result.scores,
        planned_rounds=outcome.plan.rounds,
        rounds=rounds,
        seconds_per_round_trip=sum(trips) / len(trips),
        total_seconds=time.perf_counter() - start,
        secure=None if aggregator is None else aggregator.summary(),
    )
    write_report(report, report_path)
    return report


def _serve_probe(exchange: Any, job: ServerJob, run_id: int, start: float) -> JobReport:
    if job.secure is None:
        raise InvalidInputError("probing the sites needs the job's [secure] table (its key, roster and bounds)")
    probe = probe_sites(exchange, job.secure, job_id=f"probe-{run_id}-{secrets.token_hex(4)}")
    report = JobReport(
        status="finished" if probe.passed else "failed", run_id=run_id, sites=len(exchange.nodes),
        total_seconds=time.perf_counter() - start, probes=probe.results, failures=probe.failures(),
        error=None if probe.passed else (
            "some sites did not refuse every forged request (see failures): do not run secure jobs with them "
            "until their data owners run a fedmte site agent that refuses them (a site runner with a state_dir)"),
    )
    write_report(report, Path(job.report))
    return report


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


def server_job(job: JobFile, *, probe: bool = False) -> ServerJob:
    return ServerJob(
        scorers=job.scorers, options=job.options, num_classes=job.num_classes, offset=job.offset,
        min_sites=job.min_sites, connect_timeout=job.connect_timeout, round_timeout=job.round_timeout,
        report=str(Path(job.out).resolve()), secure=job.secure, probe=probe,
        transcript=None if job.transcript is None else str(Path(job.transcript).resolve()),
    )


def submit_run(job_text: str, connection: str, env: dict[str, str], fab_dir: Path = FAB_DIR) -> int:
    """``flwr run <fab> <connection> --run-config`` with ``job = <job_text>``; the run id."""
    with tempfile.TemporaryDirectory(prefix="fedmte-run-") as tmp:
        overrides = Path(tmp) / "run_config.toml"
        overrides.write_text(f"job = {json.dumps(job_text)}\n", encoding="utf-8")
        started = _flwr_json(["run", str(fab_dir), connection, "--run-config", str(overrides)], env)
    return int(started["run-id"])


def wait_for_status(path: Path, run_id: int, connection: str, env: dict[str, str], timeout: float, *,
                    poll: float = 0.1, status_every: float = 3.0) -> JobReport:
    """Wait until the ServerApp wrote ``path`` (a :class:`JobReport`) for ``run_id``.

    Every ``status_every`` seconds ``flwr ls`` is asked too, so a run that ended without
    writing it (killed, or failed before it could) is an error at once, not at the timeout.
    """
    deadline = time.monotonic() + timeout
    next_status = time.monotonic() + status_every
    while True:
        if path.exists():
            report = read_report(path)
            if report.run_id == run_id:
                return report
        if time.monotonic() > next_status:
            status, details = run_status(connection, run_id, env)
            if status.startswith("finished"):
                if path.exists() and read_report(path).run_id == run_id:
                    return read_report(path)
                raise FederationError(f"run {run_id} ended as {status} without a report: {details}")
            next_status = time.monotonic() + status_every
        if time.monotonic() > deadline:
            raise FederationError(f"run {run_id} did not finish within {timeout:.0f} s; stop it with `flwr stop {run_id}`")
        time.sleep(poll)


def launch(job: JobFile, *, fab_dir: Path = FAB_DIR, poll: float = 0.1, status_every: float = 3.0,
           probe: bool = False) -> JobReport:
    """Submit ``job`` with ``flwr run`` and wait for the ServerApp's report.

    ``probe``: instead of scoring, probe the sites with forged requests
    (:mod:`fedmte.server.site_probe`; needs ``job.secure``). Raises :class:`FederationError`
    when the run fails (with the sites' reasons when the ServerApp could report them), when a
    site did not refuse a probe, or when the run does not finish within ``job.run_timeout``.
    """
    if probe and job.secure is None:
        raise InvalidInputError("probing the sites needs the job's [secure] table (its key, roster and bounds)")
    env = flwr_env(job.flwr_home)
    out = Path(job.out).resolve()
    out.unlink(missing_ok=True)
    run_id = submit_run(server_job(job, probe=probe).model_dump_json(), job.connection, env, fab_dir)
    report = wait_for_status(out, run_id, job.connection, env, job.run_timeout, poll=poll, status_every=status_every)
    if report.status == "failed":
        raise FederationError(f"run {run_id} failed: {report.error}", failures=report.failures)
    return report
