"""The ``fedmte`` command line: one Typer app, one module per command group."""

from __future__ import annotations

from typing import Annotated

import typer

from fedmte.cli import audit as audit_commands
from fedmte.cli import demo as demo_commands
from fedmte.cli import evaluate as evaluate_commands
from fedmte.cli import features as features_commands
from fedmte.cli import init as init_commands
from fedmte.cli import local as local_commands
from fedmte.cli import model as model_commands
from fedmte.cli import run as run_commands
from fedmte.cli import score as score_commands
from fedmte.cli import site as site_commands

app = typer.Typer(
    name="fedmte",
    help="Privacy-preserving federated model transferability estimation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedmte {installed_version()}")
        raise typer.Exit()


def installed_version() -> str:
    """The installed distribution's version (its metadata; no package of fedmte is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedmte")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from fedmte import __version__

        return __version__


@app.callback()
def _root(
    show_version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                               help="print the installed version and exit")] = False,
) -> None:
    """Privacy-preserving federated model transferability estimation."""


score_commands.register(app)
evaluate_commands.register(app)
audit_commands.register(app)
site_commands.register(app)
init_commands.register(app)
model_commands.register(app)
features_commands.register(app)
local_commands.register(app)
run_commands.register(app)
demo_commands.register(app)


def main() -> None:
    app()
