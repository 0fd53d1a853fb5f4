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
    from fedmte.server.ranking import RankedModel
    from fedmte.server.report import RunStatus

console = Console()


def _run_models(job_file: Path) -> None:
    from fedmte.server.coordinator import run_job
    from fedmte.server.job import load_job
    from fedmte.server.report import clamp_text, decision_text, recommendation_text, shown_rank, uncertainty_text

    job = load_job(job_file)
    report = run_job(job)
    noisy = report.noise_shown
    level = f"{report.uncertainty.level:.0%}" if report.uncertainty is not None else ""
    table = Table(title="ranking" + (f" (score [{level} interval]; n= : tied under the noise)" if noisy else ""))
    table.add_column("rank", justify="right")
    table.add_column("model")
    table.add_column("status")
    for scorer in report.scorers:
        table.add_column(scorer, justify="right")
    if noisy:
        table.add_column("p(best)", justify="right")
        table.add_column(f"p(top {report.top_k})", justify="right")
    for model in report.models:
        cells = [_score_cell(model, s, noisy) for s in report.scorers]
        u = model.uncertainty
        chances = ([f"{u.p_best:.2f}", f"{u.p_top_k:.2f}"] if u is not None else ["-", "-"]) if noisy else []
        table.add_row(shown_rank(model).replace("—", "-"), model.name, model.status, *cells, *chances)
    console.print(table)
    stats = [r for r in report.rounds if r.kinds]
    trip = sum(r.seconds for r in stats) / len(stats) if stats else 0.0
    console.print(f"{len(report.sites)} sites, {len(report.rounds)} round trips ({len(stats)} statistics rounds, "
                  f"{trip:.2f} s each); recommended: {recommendation_text(report) or 'none'}", soft_wrap=True)
    console.print(f"uncertainty: {uncertainty_text(report)}", soft_wrap=True, highlight=False)
    if report.decision is not None:
        console.print(f"confirmed by transfer: {decision_text(report)}", soft_wrap=True, highlight=False)
    for model in report.models:
        for scorer in model.clamped:
            console.print(f"{model.name}: {clamp_text(model, scorer)}", soft_wrap=True, highlight=False)
    for note in report.notes:
        console.print(f"note: {note}", soft_wrap=True, highlight=False)
    console.print(f"report written to {Path(job.output) / 'report.json'} and report.html", soft_wrap=True)


def _score_cell(model: RankedModel, scorer: str, noisy: bool) -> str:
    """A score, ``*`` when clamped into its range, with its interval under noise."""
    if scorer not in model.scores:
        return "failed"
    text = f"{model.scores[scorer]:.6g}" + ("*" if scorer in model.clamped else "")
    found = model.uncertainty.intervals.get(scorer) if noisy and model.uncertainty is not None else None
    return text + (f" [{found.low:.3g}, {found.high:.3g}]" if found is not None else "")


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
