"""What every `recflow` command shares: the Typer app, the consoles, the --params option and progress display."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

app = typer.Typer(
    name="recflow",
    help="recflow: events in, recommendations out. Each command is one stage of the batch loop; "
    "paths and parameters default to params.yaml.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _results_console() -> Console:
    """Rich fits output to 80 columns when it is not a terminal (a pipe, a file, a CI log) and cuts table cells
    to fit, figures included: results written there are as wide as their tables need (up to 200 columns) unless
    COLUMNS sets a width."""
    terminal = Console()
    return terminal if terminal.is_terminal or "COLUMNS" in os.environ else Console(width=200)


console = Console(stderr=True)  # progress, status and errors
out = _results_console()  # results

ParamsOption = Annotated[Path, typer.Option("--params", help="Parameter file (paths and knobs).")]


@app.callback()
def _configure(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each step.")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


@contextmanager
def steps(description: str) -> Iterator[Progress]:
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[step]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        yield progress
