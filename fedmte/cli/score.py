"""``fedmte score``: score a model's features with the federated protocol, in process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from fedmte.api import score_detailed
from fedmte.cli.errors import friendly_errors
from fedmte.protocol.errors import InvalidInputError

console = Console()


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` file, read without pickle."""
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


def register(app: typer.Typer) -> None:
    app.command("score")(score)
