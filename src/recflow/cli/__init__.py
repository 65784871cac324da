"""The `recflow` command line: one command per stage, each a thin shell over a library function.

The commands live by area (`batch`, `stream`, `operate`) and register themselves on the one Typer app in
`common`; importing them here puts them in `recflow --help` in that order.
"""

from __future__ import annotations

import sys

from recflow.cli import batch, operate, stream  # noqa: F401 - registers the commands
from recflow.cli.common import app, console
from recflow.errors import RecflowError
from recflow.threads import limit_blas_threads

__all__ = ["app", "main"]


def main() -> None:
    limit_blas_threads()  # once, before any stage runs (they import numpy lazily)
    try:
        app()
    except RecflowError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)
