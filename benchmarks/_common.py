"""Shared bits of the benchmarks: machine facts and table printing."""

from __future__ import annotations

import os
import platform
import resource
import sys

from rich.console import Console
from rich.table import Table


def machine() -> str:
    import implicit
    import lightgbm
    import numpy
    import pyarrow

    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, numpy {numpy.__version__}, "
        f"pyarrow {pyarrow.__version__}, implicit {implicit.__version__}, lightgbm {lightgbm.__version__}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}"
    )


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def print_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == columns[0] else "right")
    for row in rows:
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
    Console().print(table)
