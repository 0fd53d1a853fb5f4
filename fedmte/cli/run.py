"""``fedmte run JOB.toml``: run a scoring job over a Flower federation and write its report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedmte.cli.errors import friendly_errors
from fedmte.server.job_runner import launch, load_job_file

console = Console()


@friendly_errors
def run(
    job_file: Annotated[Path, typer.Argument(metavar="JOB.toml", help="the job: connection, scorers, classes, report path")],
) -> None:
    """Launch the job against its Flower connection, wait for it, print the scores."""
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


def register(app: typer.Typer) -> None:
    app.command("run")(run)
