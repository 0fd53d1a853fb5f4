"""``fedmte run JOB.toml``: run a scoring job over a Flower federation and write its report.

A job file with ``candidates`` is a :class:`~fedmte.server.job.JobSpec`: the candidate
models go to the sites, which run them on their own data, and the report (``report.json``,
``report.html``) ranks them (:func:`fedmte.server.coordinator.run_job`). A job file with
``num_classes`` and ``out`` instead is a job over sites that hold precomputed features
(:class:`~fedmte.server.job_runner.JobFile`), whose JSON report lists the scores.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedmte.cli.errors import friendly_errors
from fedmte.protocol.errors import FederationError, InvalidInputError

if TYPE_CHECKING:
    from fedmte.server.job_runner import JobFile, JobReport

console = Console()


def _is_model_job(path: Path) -> bool:
    try:
        return "candidates" in tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise InvalidInputError(f"job file {path} cannot be read as TOML: {error}") from None


def _run_models(job_file: Path) -> None:
    from fedmte.server.coordinator import run_job
    from fedmte.server.job import load_job

    job = load_job(job_file)
    report = run_job(job)
    table = Table(title="ranking")
    table.add_column("rank", justify="right")
    table.add_column("model")
    table.add_column("status")
    for scorer in report.scorers:
        table.add_column(scorer, justify="right")
    for model in report.models:
        cells = [f"{model.scores[s]:.6g}" if s in model.scores else "failed" for s in report.scorers]
        table.add_row("-" if model.rank is None else str(model.rank), model.name, model.status, *cells)
    console.print(table)
    stats = [r for r in report.rounds if r.kinds]
    trip = sum(r.seconds for r in stats) / len(stats) if stats else 0.0
    console.print(f"{len(report.sites)} sites, {len(report.rounds)} round trips ({len(stats)} statistics rounds, "
                  f"{trip:.2f} s each); recommended: {', '.join(report.recommendation) or 'none'}", soft_wrap=True)
    for note in report.notes:
        console.print(f"note: {note}", soft_wrap=True, highlight=False)
    console.print(f"report written to {Path(job.output) / 'report.json'} and report.html", soft_wrap=True)


def _run_features(job_file: Path) -> None:
    from fedmte.server.job_runner import launch, load_job_file

    job = load_job_file(job_file)
    report = launch(job)
    table = Table()
    table.add_column("scorer")
    table.add_column("score", justify="right")
    for name, value in report.scores.items():
        table.add_row(name, f"{value:.6g}")
    console.print(table)
    console.print(f"run {report.run_id}: {report.sites} sites, {len(report.rounds)} round trips "
                  f"({report.seconds_per_round_trip:.2f} s each); report written to {job.out}", soft_wrap=True)


@friendly_errors
def run(
    job_file: Annotated[Path, typer.Argument(metavar="JOB.toml", help="the job: connection, candidates, labels, scorers")],
) -> None:
    """Launch the job against its Flower connection, wait for it, print the ranking."""
    if not job_file.is_file():
        raise InvalidInputError(f"job file {job_file} does not exist")
    if _is_model_job(job_file):
        _run_models(job_file)
    else:
        _run_features(job_file)


def _probe_job(job_file: Path, out: Path) -> JobFile:
    """The probe's settings from either kind of job file: connection, [secure], site count, timeouts."""
    from fedmte.server.job_runner import JobFile, load_job_file

    if not _is_model_job(job_file):
        return load_job_file(job_file).model_copy(update={"out": out.resolve()})
    from fedmte.server.job import load_job

    job = load_job(job_file)
    settings = job.federation
    return JobFile(
        connection=job.connection, flwr_home=settings.flwr_home, out=out.resolve(), num_classes=len(job.labels),
        secure=job.secure, min_sites=settings.min_sites, connect_timeout=settings.connect_timeout,
        round_timeout=settings.round_timeout, run_timeout=settings.run_timeout,
    )


@friendly_errors
def probe(
    job_file: Annotated[Path, typer.Argument(metavar="JOB.toml", help="a job with a \\[secure] table")],
    out: Annotated[Path, typer.Option("--out", help="where the probe's JSON report goes")] = Path("probe.json"),
) -> None:
    """Check that every site refuses forged, tampered and replayed secure-sum requests.

    Sends each site a request signed by an unknown key, one altered after signing, a valid
    control and the control again, then a signed end; no statistics are asked for. Exits
    with an error naming every site that did not refuse a forgery for the right reason.
    """
    from fedmte.server.job_runner import launch, read_report

    if not job_file.is_file():
        raise InvalidInputError(f"job file {job_file} does not exist")
    job = _probe_job(job_file, out)
    if job.secure is None:
        raise InvalidInputError(f"{job_file} has no [secure] table; the probe checks the secure sum's request rules")
    try:
        report = launch(job, probe=True)
    except FederationError:  # launch removed any older report first: a report here is this probe's
        written = read_report(out.resolve()) if out.is_file() else None
        if written is not None and written.probes:
            _print_probes(written)
        raise
    _print_probes(report)
    console.print(f"every site refused every forged request; report written to {out}", soft_wrap=True)


def _print_probes(report: JobReport) -> None:
    table = Table(title="site probe")
    table.add_column("probe")
    table.add_column("site")
    table.add_column("result")
    for result in report.probes or []:
        verdict = ("refused: " + result.reason) if result.refused else "accepted"
        table.add_row(result.probe, str(result.node), ("" if result.as_expected else "UNEXPECTED ") + verdict)
    console.print(table, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("probe")(probe)
