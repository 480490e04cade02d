"""Helpers shared by the CLI commands: loading models and data, printing tables, clean errors."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

console = Console()
F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(fn: F) -> F:
    """Turn the errors we raise for bad input into one red line and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    """Print key/value rows as a table."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def model_option(fn: F) -> F:
    """``--model SPEC`` and ``--weights FILE`` options."""
    fn = click.option(
        "--weights", type=click.Path(dir_okay=False), default=None,
        help="safetensors file with the model's weights (for a file.py:factory spec).",
    )(fn)
    return click.option(
        "--model", "model_spec", required=True, metavar="SPEC",
        help="zoo:NAME, path/to/file.py:factory, or package.module:factory.",
    )(fn)  # type: ignore[return-value]
