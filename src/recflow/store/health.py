"""Whether the event store's files can be read, and which cannot.

A store file that cannot be read (truncated, overwritten, not Parquet, another schema) is a fault of the
store, never of the records being stored beside it: every reader of the store (dedup, scans, summaries) runs
inside `reading(files)`, which turns a read failure into `CorruptStoreError` naming the bad files, so the
consumer stops with that reason instead of dead-lettering good events. `check_store` (`recflow store check`)
reads every file in full and lists the ones that fail.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from recflow.errors import CorruptStoreError
from recflow.events.contract import STORE_SCHEMA

logger = logging.getLogger(__name__)

# what a reader raises for a file it cannot decode (not OSError: a missing permission is reported as it is)
_DECODE_ERRORS = (duckdb.Error, pa.ArrowException)


@dataclass(frozen=True)
class CorruptFile:
    path: Path
    problem: str


def data_files(store: Path) -> list[Path]:
    """The committed data files of the store (hidden temporary files excluded), in path order."""
    store = Path(store)
    return sorted(store.glob("date=*/part-*.parquet")) if store.is_dir() else []


def check_file(path: Path, *, full: bool = True) -> str | None:
    """Why `path` is not a readable store file (None when it is): its footer and schema, and with `full` every
    column of every row group, are read."""
    try:
        with pq.ParquetFile(path) as parquet:
            schema = parquet.schema_arrow
            missing = [name for name in STORE_SCHEMA.names if name not in schema.names]
            if missing:
                return f"no column(s) {', '.join(missing)}: not a store file"
            if full:
                for group in range(parquet.num_row_groups):
                    parquet.read_row_group(group, columns=STORE_SCHEMA.names)
    except (OSError, *_DECODE_ERRORS) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def check_store(store: Path, *, progress: Callable[[int, int], None] | None = None) -> list[CorruptFile]:
    """Every data file of the store that cannot be read in full, with the reason (an empty list: all good)."""
    files = data_files(store)
    bad = []
    for done, path in enumerate(files, 1):
        problem = check_file(path)
        if problem is not None:
            bad.append(CorruptFile(path, problem))
        if progress is not None:
            progress(done, len(files))
    return bad


@contextmanager
def reading(files: Sequence[Path | str], store: Path) -> Iterator[None]:
    """Read store `files` in the block; a decoding failure in which some of them turn out unreadable raises
    CorruptStoreError naming them (other failures are raised as they are)."""
    try:
        yield
    except _DECODE_ERRORS as exc:
        bad = [(Path(f), p) for f in files if (p := check_file(Path(f), full=False)) is not None]
        if not bad:
            bad = [(Path(f), p) for f in files if (p := check_file(Path(f))) is not None]
        if not bad:
            raise
        shown = "; ".join(f"{path}: {problem.rstrip('.')}" for path, problem in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise CorruptStoreError(
            f"{len(bad)} file(s) of the event store {store} cannot be read: {shown}{more}. Restore them (dvc "
            "checkout, a backup) or move them out of the store, then run again; `recflow store check` lists them all",
            tuple(str(path) for path, _ in bad),
        ) from exc
