"""Turn fedmte's typed errors into a one-line message and exit code 2 at the CLI edge."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from fedmte.protocol.errors import FedmteError

P = ParamSpec("P")
R = TypeVar("R")

stderr = Console(stderr=True, soft_wrap=True)  # messages stay on one line, whatever the width


def friendly_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Print a :class:`FedmteError` as ``error: ...`` and exit 2 instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except FedmteError as error:
            stderr.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper
