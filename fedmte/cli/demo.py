"""``fedmte demo``: three sites, seven candidate models, one ranking, with no input.

See :mod:`fedmte.trial.demo` for what it lays out and runs. This module only shows it: a
progress display on stderr, then the ranking table, the recommendation, how well each
scorer's ranking matches the ground truth, and each site's audit-log verification.
Exit status 0 when everything ran and every audit log verified, 1 when an audit log did
not verify, 2 on an error (printed as one line), 130 when interrupted.
"""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedmte.cli.errors import friendly_errors

if TYPE_CHECKING:  # the demo (torch, flwr, scikit-learn) loads when the command runs, not for --help
    from fedmte.trial.demo import DemoResult

# The option defaults of fedmte.trial.demo, written out so that --help need not import it;
# tests/test_cli_startup.py checks that they match.
DEFAULT_OUT = Path("fedmte-demo")
MIN_SITES, MAX_SITES = 3, 12

console = Console()
stderr = Console(stderr=True)

DP_OFF_WARNING = (
    "warning: DP is off, so the sites release exact sums: a coordinator who picks the model weights can reconstruct "
    "rows exactly (ReLU imprint models) and test membership (a tiny-variance mixture component); only DP bounds what "
    "crafted weights can extract (README: Threat model)"
)
"""The one line ``fedmte demo --dp off`` and ``fedmte local up --no-dp`` print before anything starts."""


def warn_if_dp_off(dp: bool, out: Console | None = None) -> bool:
    """Print :data:`DP_OFF_WARNING` on ``out`` (stderr) when ``dp`` is off; returns whether it did."""
    if dp:
        return False
    (out or Console(stderr=True, soft_wrap=True)).print(DP_OFF_WARNING, style="bold yellow", markup=False,
                                                         highlight=False, soft_wrap=True)
    return True


class Switch(str, Enum):
    on = "on"
    off = "off"


class _Display:
    """Stages as lines with a spinner and elapsed time; details update the current line."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: TaskID | None = None
        self.title = ""

    def stage(self, title: str) -> None:
        self._finish()
        self.title = title
        self.task = self.progress.add_task(title, total=1)

    def detail(self, text: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=f"{self.title}: [dim]{text}[/]")

    def _finish(self) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=f"[green]✓[/] {self.title}", completed=1)

    def close(self) -> None:
        self._finish()


def _cell(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _ranking_table(result: DemoResult) -> Table:
    """One row per model: final rank (``1=`` when the noise cannot order it), aggregate, its rank
    under each scorer, its chance of being best under DP noise, ground truth, status.
    (The scores and their intervals are in report.json and report.html.)"""
    from fedmte.server.report import shown_rank

    report = result.report
    truth = result.setup.ground_truth
    aggregate = report.aggregate.replace("_", " ")
    noisy = report.noise_shown
    table = Table(title=f"Ranking by {aggregate} ({report.better} is better), with each scorer's rank"
                        + ("; n= : tied under the DP noise" if noisy else "")
                        + "; ✓ recommended, ! breaks a constraint, × filtered out",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column(aggregate.split()[0], justify="right", no_wrap=True)
    for scorer in report.scorers:
        table.add_column(scorer, justify="right", no_wrap=True)
    if noisy:
        table.add_column("p(best)", justify="right", no_wrap=True)
    table.add_column("truth", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)  # the status mark
    for model in report.models:
        style = {"recommended": "bold green", "flagged": "yellow", "filtered": "dim"}.get(model.status, "")
        chance = ([f"{model.uncertainty.p_best:.2f}" if model.uncertainty is not None else "—"] if noisy else [])
        table.add_row(
            shown_rank(model), model.name, _cell(model.aggregate, 3),
            *(f"{model.ranks[s]:g}" + ("*" if s in model.clamped else "") if s in model.ranks else "—"
              for s in report.scorers),
            *chance,
            "—" if model.name not in truth else f"{truth[model.name]:.2f}",
            f"[{style}]{STATUS_MARK[model.status]}[/]" if style else STATUS_MARK[model.status],
        )
    return table


STATUS_MARK = {"recommended": "✓", "flagged": "!", "filtered": "×", "eligible": ""}
"""One-character status marks, so the table fits 80 columns (its title says what they mean)."""


def _evaluation_table(result: DemoResult) -> Table:
    table = Table(title="Scorers against the ground truth (linear-probe accuracy on held-out digits)",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    for column, justify in (("scorer", "left"), ("weighted τ", "right"), ("Kendall τ", "right"),
                            ("top-1 regret", "right"), ("picked", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for scorer, metrics in result.evaluation.items():
        table.add_row(scorer, _cell(metrics.weighted_tau, 3), _cell(metrics.kendall_tau, 3),
                      f"{metrics.top1_regret:.3g}", ", ".join(metrics.picked))
    return table


def _show(result: DemoResult, dp: bool) -> None:
    report = result.report
    console.print(_ranking_table(result))
    from fedmte.server.report import clamp_text, decision_text, recommendation_text, uncertainty_text

    picks = recommendation_text(report) or "none"
    console.print(f"[bold]Recommended (top {report.top_k}):[/] {picks}", highlight=False)
    if report.decision is not None:
        console.print(f"[bold]Confirmed by transfer:[/] {decision_text(report)}", highlight=False)
    console.print(f"  uncertainty: {uncertainty_text(report)}", highlight=False)
    for model in report.models:
        for scorer in model.clamped:
            console.print(f"  [red]{model.name}[/] {clamp_text(model, scorer)}", highlight=False)
    for model in report.models:
        for violation in model.violations:
            done = {"flag": "flagged", "filter": "filtered out"}[violation.action]
            console.print(f"  [yellow]{model.name}[/] {done}: {violation.message}", highlight=False)
    for note in report.notes:
        console.print(f"  note: {note}", highlight=False)
    if result.evaluation:
        console.print(_evaluation_table(result))
    privacy = report.privacy
    spent = "" if privacy.epsilon_spent_max is None else f", epsilon spent per site up to {privacy.epsilon_spent_max:.3g}"
    console.print(f"Privacy: DP {'on' if dp else 'off'}{spent}; secure sum {'on' if privacy.secure_sum else 'off'}",
                  highlight=False)
    for check in result.audits:
        mark = "[green]✓[/]" if check.ok else "[bold red]✗[/]"
        text = check.verification.summary() + (f"; ledger: {check.ledger_problem}" if check.ledger_problem else "")
        console.print(f"{mark} fedmte audit verify {check.audit_dir}: {text}", highlight=False)
    out = result.setup.out
    console.print(f"Wrote {out / 'report.html'}, {out / 'report.json'}, {out / 'job.toml'}, "
                  f"{out / 'ground_truth.json'}, {out / 'evaluation.json'}, {out / 'models'}/, {out / 'sites'}/",
                  highlight=False)


@friendly_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="folder for the report, packages, site files and audit logs")] = DEFAULT_OUT,
    sites: Annotated[int, typer.Option("--sites", min=MIN_SITES, max=MAX_SITES, help="number of sites")] = 3,
    dp: Annotated[Switch, typer.Option("--dp", help="differential privacy at the sites (the default policy) or off")] = Switch.on,
    zoo_cache: Annotated[Path | None, typer.Option(
        "--zoo-cache", help="where the model zoo is cached (default: $FEDMTE_CACHE/zoo or ~/.cache/fedmte/zoo)")] = None,
    in_process: Annotated[bool, typer.Option(
        "--in-process", help="run the sites in this process, their releases summed by the secure sum there "
        "(no network) instead of over a loopback Flower federation")] = False,
) -> None:
    """Score a zoo of candidate models at label-skewed sites holding scikit-learn's digits, rank them,
    write the report and verify every site's audit log."""
    from fedmte.trial.demo import DemoOptions, run_demo

    started = time.perf_counter()
    use_dp = dp is Switch.on
    stderr.print(f"fedmte demo: {sites} sites, DP {'on' if use_dp else 'off'}, output in {out}", highlight=False)
    warn_if_dp_off(use_dp)
    progress = Progress(SpinnerColumn(finished_text=" "), TextColumn("{task.description}"), TimeElapsedColumn(),
                        console=stderr, transient=False)
    display = _Display(progress)
    try:
        with progress:
            try:
                options = DemoOptions(out=out, sites=sites, dp=use_dp, zoo_cache=zoo_cache,
                                      transport="in-process" if in_process else "federation")
                result = run_demo(options, display)
            finally:
                display.close()
    except KeyboardInterrupt:
        stderr.print("[bold red]interrupted[/]: the federation was stopped and every site's audit log closed; "
                     "the output folder is incomplete")
        raise typer.Exit(130) from None
    _show(result, use_dp)
    console.print(f"Finished in {time.perf_counter() - started:.1f} s.", highlight=False)
    if not result.audits_ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
