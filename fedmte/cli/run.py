"""``fedmte run JOB.toml``: run a scoring job over a Flower federation and write its report.

The job file is a :class:`~fedmte.server.job.JobSpec`: its candidates (signed model packages,
or the features the sites hold) are scored at the sites, and the report (``report.json``,
``report.html``) ranks them (:func:`fedmte.server.coordinator.run_job`). ``fedmte probe``
sends the same job's sites forged secure-sum requests instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedmte.cli.errors import friendly_errors
from fedmte.protocol.errors import FederationError, InvalidInputError

if TYPE_CHECKING:
    from fedmte.server.report import RunStatus

console = Console()


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


@friendly_errors
def run(
    job_file: Annotated[Path, typer.Argument(metavar="JOB.toml", help="the job: connection, candidates, labels, scorers")],
) -> None:
    """Launch the job against its Flower connection, wait for it, print the ranking."""
    if not job_file.is_file():
        raise InvalidInputError(f"job file {job_file} does not exist")
    _run_models(job_file)


@friendly_errors
def probe(
    job_file: Annotated[Path, typer.Argument(metavar="JOB.toml", help="a job with a \\[secure] table")],
    out: Annotated[Path, typer.Option("--out", help="the folder for the probe's run.json")] = Path("fedmte-probe"),
) -> None:
    """Check that every site refuses forged, tampered and replayed secure-sum requests.

    Sends each site a request signed by an unknown key, one altered after signing, a valid
    control and the control again, then a signed end; no statistics are asked for. Exits
    with an error naming every site that did not refuse a forgery for the right reason.
    """
    from fedmte.server.coordinator import launch
    from fedmte.server.job import load_job
    from fedmte.server.report import read_status

    if not job_file.is_file():
        raise InvalidInputError(f"job file {job_file} does not exist")
    job = load_job(job_file)
    if job.secure is None:
        raise InvalidInputError(f"{job_file} has no [secure] table; the probe checks the secure sum's request rules")
    job = job.model_copy(update={"output": out.resolve()})
    try:
        status = launch(job, probe=True)
    except FederationError:  # launch removed any older status first: one here is this probe's
        written = out / "run.json"
        if written.is_file():
            _print_probes(read_status(written))
        raise
    _print_probes(status)
    console.print(f"every site refused every forged request; status written to {out / 'run.json'}", soft_wrap=True)


def _print_probes(report: RunStatus) -> None:
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
