"""``fedmte score``: score a model's features with the federated protocol, in process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedmte.cli.errors import friendly_errors
from fedmte.protocol.errors import InvalidInputError

if TYPE_CHECKING:  # numpy, scipy and the scorers load when a command runs, not for --help
    import numpy as np

console = Console()


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` file, read without pickle."""
    import numpy as np

    if not path.is_file():
        raise InvalidInputError(f"{path} does not exist or is not a file")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (ValueError, OSError) as error:
        raise InvalidInputError(f"{path} is not a readable .npz of plain arrays: {error}") from None


def parse_scorers(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise InvalidInputError("--scorers is empty; give names separated by commas, e.g. logme,hscore")
    return names


@friendly_errors
def score(
    features_file: Annotated[Path, typer.Argument(metavar="FEATURES.npz", help="npz with features, labels and optionally source_probs")],
    scorers: Annotated[str | None, typer.Option("--scorers", help="comma-separated scorer names (default: all that apply)")] = None,
    sites: Annotated[int | None, typer.Option("--sites", min=1, help="split the rows into N uneven in-process sites")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Score one model's features; the result does not depend on --sites."""
    from fedmte.api import score_detailed

    arrays = load_npz(features_file)
    if "labels" not in arrays or ("features" not in arrays and "source_probs" not in arrays):
        raise InvalidInputError(
            f"{features_file} must hold 'labels' and 'features' (and optionally 'source_probs'); "
            f"it holds {sorted(arrays)}"
        )
    result = score_detailed(
        arrays.get("features"),
        arrays["labels"],
        source_probs=arrays.get("source_probs"),
        scorers=parse_scorers(scorers),
        sites=sites,
    )
    if as_json:
        typer.echo(json.dumps(result.scores, indent=2))
        return
    table = Table(title=f"Transferability of {features_file.name} ({len(result.rounds)} rounds, "
                        f"{result.bytes_sent_per_site:,} bytes per site)")
    table.add_column("scorer")
    table.add_column("score", justify="right")
    for name, value in result.scores.items():
        table.add_row(name, f"{value:.6g}")
    console.print(table)


def statistics_by_round(name: str) -> list[list[str]]:
    """The statistic kinds one site sends for ``name``, round by round (traced on toy data)."""
    import numpy as np

    from fedmte.api import score_detailed

    rng = np.random.default_rng(0)
    labels = np.arange(40) % 4
    features = rng.normal(size=(40, 6)) + labels[:, None]
    probs = rng.dirichlet(np.ones(5), 40)
    result = score_detailed(features, labels, source_probs=probs, scorers=[name])
    return [record.kinds for record in result.rounds]


def _round_ranges(rounds: list[list[str]], first: int) -> list[str]:
    """'R2-R28: a, b' for consecutive rounds that send the same kinds (EM iterations)."""
    groups: list[tuple[int, int, list[str]]] = []
    for index, kinds in enumerate(rounds, start=first):
        if groups and groups[-1][2] == kinds:
            groups[-1] = (groups[-1][0], index, kinds)
        else:
            groups.append((index, index, kinds))
    return [f"R{a}{'' if a == b else f'-R{b}'}: {', '.join(kinds)}" for a, b, kinds in groups]


def scorer_rows() -> list[dict[str, str]]:
    """One row per scorer: what it measures, rounds, inputs, what a site sends, its reference."""
    from fedmte.protocol.scorers import NOT_FEDERABLE, SCORERS

    rows = []
    for name, spec in SCORERS.items():
        needs = " + ".join(k for k, v in (("features", spec.needs_features), ("source probs", spec.needs_source_probs)) if v)
        first = 0 if spec.centred else 1
        sent = "; ".join(_round_ranges(statistics_by_round(name), first))
        rounds = f"{spec.rounds}{' (+R0)' if spec.centred else ''}{', iterative, opt-in' if spec.iterative else ''}"
        rows.append({"scorer": name, "measures": spec.summary, "rounds": rounds, "needs": needs, "sends": sent, "matches": spec.reference})
    for name, reason in NOT_FEDERABLE.items():
        rows.append({"scorer": name, "measures": f"not federable: {reason}", "rounds": "-", "needs": "", "sends": "", "matches": ""})
    return rows


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|")


def scorers(
    markdown: Annotated[bool, typer.Option("--markdown", help="print a Markdown table (the README's)")] = False,
) -> None:
    """List the scorers: what each measures, its rounds, what a site sends, the reference it matches.

    R0 is the centring round that agrees on the pooled mean; a public offset skips it.
    """
    from fedmte.protocol.catalogue import STATISTICS

    rows = scorer_rows()
    columns = ("scorer", "measures", "rounds", "needs", "sends", "matches")
    if markdown:
        typer.echo("| " + " | ".join(columns) + " |")
        typer.echo("|" + "---|" * len(columns))
        for row in rows:
            cells = (f"`{v}`" if c == "scorer" else _markdown_cell(v) for c, v in row.items())
            typer.echo("| " + " | ".join(cells) + " |")
        typer.echo("\n| statistic | what a site sums |\n|---|---|")
        for kind, spec in STATISTICS.items():
            typer.echo(f"| `{kind}` | {_markdown_cell(spec.summary)} |")
        return
    table = Table(title="fedmte scorers (R0: the shared centring round, skipped with a public offset)")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row.values())
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("score")(score)
    app.command("scorers")(scorers)
