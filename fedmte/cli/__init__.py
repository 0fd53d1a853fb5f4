"""The ``fedmte`` command line: one Typer app, one module per command group."""

from __future__ import annotations

import typer

from fedmte.cli import audit as audit_commands
from fedmte.cli import demo as demo_commands
from fedmte.cli import evaluate as evaluate_commands
from fedmte.cli import features as features_commands
from fedmte.cli import local as local_commands
from fedmte.cli import model as model_commands
from fedmte.cli import run as run_commands
from fedmte.cli import score as score_commands

app = typer.Typer(
    name="fedmte",
    help="Privacy-preserving federated model transferability estimation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Privacy-preserving federated model transferability estimation."""


score_commands.register(app)
evaluate_commands.register(app)
audit_commands.register(app)
model_commands.register(app)
features_commands.register(app)
local_commands.register(app)
run_commands.register(app)
demo_commands.register(app)


def main() -> None:
    app()
