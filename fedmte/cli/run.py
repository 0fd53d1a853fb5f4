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
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedmte.cli.errors import friendly_errors
from fedmte.protocol.errors import InvalidInputError

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


def register(app: typer.Typer) -> None:
    app.command("run")(run)
