"""``fedmte evaluate``: judge scorers' rankings of models against measured ground truth."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedmte.cli.errors import friendly_errors
from fedmte.protocol.errors import InvalidInputError

if TYPE_CHECKING:  # scipy loads when the command runs, not for --help
    from fedmte.protocol.evaluation import RankingMetrics

console = Console()
stderr = Console(stderr=True, soft_wrap=True)  # messages stay on one line, whatever the width


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise InvalidInputError(f"key(s) {repeated} appear more than once in the same JSON object; keep one of each")
    return dict(pairs)


def load_json(path: Path) -> object:
    """Parsed JSON of ``path``; a missing file, bad JSON or a repeated key raises InvalidInputError."""
    if not path.is_file():
        raise InvalidInputError(f"{path} does not exist or is not a file")
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except InvalidInputError as error:
        raise InvalidInputError(f"{path}: {error}") from None
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path} is not UTF-8 text; give a JSON file") from None
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}") from None


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _table(results: dict[str, RankingMetrics], truth_name: str) -> Table:
    n_models = next(iter(results.values())).n_models
    table = Table(title=f"Ranking quality against {truth_name} ({n_models} models)")
    table.add_column("scorer")
    for header in ("weighted τ", "τ-b", "Spearman", "Pearson", "regret", "rel. regret"):
        table.add_column(header, justify="right")
    table.add_column("picked")
    for scorer, metrics in results.items():
        table.add_row(
            scorer,
            _cell(metrics.weighted_tau),
            _cell(metrics.kendall_tau),
            _cell(metrics.spearman),
            _cell(metrics.pearson),
            f"{metrics.top1_regret:.4g}",
            _cell(metrics.top1_relative_regret),
            ", ".join(metrics.picked),
        )
    return table


@friendly_errors
def evaluate(
    scores_file: Annotated[Path, typer.Argument(metavar="SCORES.json", help="{model: score}, {scorer: {model: score}} or a report {\"models\": [...]}")],
    truth_file: Annotated[Path, typer.Argument(metavar="TRUTH.json", help="{model: ground truth, e.g. fine-tuned accuracy}")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Compare each scorer's ranking of the models with the ground truth (weighted τ, regret, ...)."""
    from fedmte.protocol.evaluation import evaluate_rankings, parse_scores, parse_truth

    scores = parse_scores(load_json(scores_file), scores_file.name)
    truth = parse_truth(load_json(truth_file), truth_file.name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = evaluate_rankings(scores, truth)
    for warning in caught:
        stderr.print(f"[yellow]warning:[/] {warning.message}", highlight=False)
    if as_json:
        typer.echo(json.dumps({scorer: metrics.model_dump(mode="json") for scorer, metrics in results.items()}, indent=2))
        return
    console.print(_table(results, truth_file.name))


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
