"""The `recflow` command line: one command per stage, each a thin shell over a library function.

The commands live by area (`batch`, `stream`, `operate`) and register themselves on the one Typer app in
`common`; importing them here puts them in `recflow --help` in that order.
"""

from __future__ import annotations

import os
import sys

from recflow.cli import batch, operate, stream  # noqa: F401 - registers the commands
from recflow.cli.common import app, console
from recflow.errors import RecflowError

__all__ = ["app", "main"]


def main() -> None:
    # Before numpy is imported (the stages import it lazily): implicit and the ranker run several times
    # slower when OpenBLAS starts its own threads next to theirs.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        app()
    except RecflowError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)
