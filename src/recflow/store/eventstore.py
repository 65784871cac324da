"""The event store: an append-only Parquet dataset partitioned by the UTC date of each event.

Layout: `<store>/date=YYYY-MM-DD/part-<batch digest>.parquet`, columns in STORE_SCHEMA order, beside two hidden
files: `.writer.lock` and `.explicit-id-files`. A batch is written atomically: each of its files goes to a hidden
name (".part-...") in its target directory, which readers (pyarrow.dataset, `scan_store`, duckdb globs of
`part-*.parquet`) ignore, and is then renamed into place with os.replace (each file fsynced before, each folder
after, the store's parent too when the store is new: `recflow.files`), so a commit that returned survives a
power cut. A crash leaves no half-written file; replaying the batch is safe because every event whose event_id
is already stored is counted as a duplicate and not written again. Refused records go to the rejected log
(`recflow.store.rejected`), each kept once.

One writer at a time, whoever it is: every commit (dedup check, then write) runs under an exclusive OS lock on
`<store>/.writer.lock` (`recflow.files.exclusive_lock`), so `recflow ingest`, the Prefect ingest flow, `recflow
consume` and any other process may write at once and each event is stored exactly once; validation runs outside
the lock. That holds for one machine's local filesystem. A store shared between machines (NFS, or object storage,
which has no locks nor atomic renames) needs a table format with atomic multi-writer commits instead (Delta Lake,
Iceberg: optimistic commits to a transaction log, retried on conflict), or a single writer fed by the event log.

Dedup compares event_id strings exactly, within the batch (the first occurrence wins; hashes single out the
rows that can repeat) and against the stored event ids it can collide with, in one DuckDB anti-join. An id
derived from the event's fields (the usual case: no event_id given) includes its timestamp, so it can only be
stored already in the same date partition, unless some stored event carries that id explicitly: the files that
hold ids not derived from their own row's fields are listed in `.explicit-id-files` (appended before the files
are renamed in; rebuilt by reading the store once when the list is missing). A batch of derived ids is checked
against its dates' partitions and the listed files: its cost is bounded by the new data, not the history. A
batch that brings ids of its own (which can collide anywhere) is checked against the whole store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from recflow.config import EventSettings
from recflow.constants import ACTION, EVENT_ID, ITEM_ID, TIMESTAMP, USER_ID
from recflow.errors import InputFileError
from recflow.events.contract import STORE_SCHEMA, Rejection, derive_event_ids, duckdb_cursor, validate_table
from recflow.events.fileio import EVENT_FILE_SUFFIXES, read_event_file, read_json_lines
from recflow.files import exclusive_lock, fsync_dir, fsync_file
from recflow.store.health import data_files as _data_files
from recflow.store.health import reading
from recflow.store.rejected import write_rejected

logger = logging.getLogger(__name__)

_DAY_MS = 86_400_000
_EPOCH_DAY = date(1970, 1, 1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
LOCK_FILE = ".writer.lock"  # in the store folder: every writer's turn (see the module docstring)
EXPLICIT_ID_FILES = ".explicit-id-files"  # in the store folder: files holding ids not derived from their row
_HASH_SLOTS = 1 << 20  # _first_occurrences: slots of the filter table (1 MB)
_WRITE_OPTIONS: dict[str, Any] = {
    # snappy writes fastest; zstd level 1 makes the files ~45% smaller (hex event ids compress) for ~40% more
    # write CPU (2M events: 73 vs 41 MB, 0.86 vs 1.22 CPU s)
    "compression": "snappy",
    "use_dictionary": [USER_ID, ITEM_ID, ACTION],  # random event ids do not compress
    "write_statistics": [TIMESTAMP, ACTION],
}


@dataclass
class IngestReport:
    """What happened to the records of one batch (or, after `+`, of several)."""

    read: int = 0
    stored: int = 0
    duplicate: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # rejection code -> count
    rejected_path: Path | None = None  # the rejected log of this batch (after `+`: of the last batch)
    rejected_paths: tuple[Path, ...] = ()  # every rejected log behind this report

    def __post_init__(self) -> None:
        if self.read != self.stored + self.duplicate + self.rejected:
            raise ValueError(f"report does not add up: read {self.read} != {self.stored} stored "
                             f"+ {self.duplicate} duplicate + {self.rejected} rejected")  # fmt: skip
        if sum(self.reasons.values()) != self.rejected:
            raise ValueError(f"rejection reasons {self.reasons} do not add up to {self.rejected}")
        if self.rejected_path is not None and not self.rejected_paths:
            self.rejected_paths = (self.rejected_path,)

    def __add__(self, other: IngestReport) -> IngestReport:
        paths = self.rejected_paths + other.rejected_paths
        return IngestReport(
            read=self.read + other.read,
            stored=self.stored + other.stored,
            duplicate=self.duplicate + other.duplicate,
            rejected=self.rejected + other.rejected,
            reasons=dict(Counter(self.reasons) + Counter(other.reasons)),
            rejected_path=paths[-1] if paths else None,
            rejected_paths=paths,
        )


@dataclass(frozen=True)
class StoreSummary:
    events: int
    users: int
    items: int
    first: datetime | None
    last: datetime | None
    partitions: int
    files: int


def ingest_files(
    paths: Sequence[Path],
    *,
    store: Path,
    rejected: Path,
    settings: EventSettings,
    now: datetime | None = None,
    on_file: Callable[[Path, IngestReport], None] | None = None,
) -> IngestReport:
    """Ingest event files (a directory stands for its *.jsonl, *.json, *.csv and *.parquet files, sorted),
    one batch per file. Every path is checked before anything is written."""
    files = _expand(paths)
    total = IngestReport()
    for path in files:
        table, unreadable = read_event_file(path)
        report = _ingest_read(table, unreadable, source=str(path), store=store, rejected=rejected, settings=settings,
                              now=now)  # fmt: skip
        if on_file is not None:
            on_file(path, report)
        total = total + report
    return total


def ingest_json_lines(
    data: bytes,
    *,
    source: str,
    store: Path,
    rejected: Path,
    settings: EventSettings,
    now: datetime | None = None,
) -> IngestReport:
    """Ingest JSON Lines text held in memory (the event stream's batches) exactly as a .jsonl file would be:
    one batch, records numbered by line, unreadable lines rejected as `bad_json`."""
    table, unreadable = read_json_lines(data, source=source)
    return _ingest_read(table, unreadable, source=source, store=store, rejected=rejected, settings=settings, now=now)


def ingest_table(
    table: pa.Table,
    *,
    source: str,
    store: Path,
    rejected: Path,
    settings: EventSettings,
    now: datetime | None = None,
) -> IngestReport:
    """Validate and store the rows of an in-memory table (any column types; see events.validate_table)."""
    batch = validate_table(table, settings=settings, source=source, now=now)
    return _commit(batch.accepted, batch.rejected, read=table.num_rows, store=store, rejected=rejected, source=source,
                   ids_given=_brings_ids(table))  # fmt: skip


def record_rejections(rejections: Sequence[Rejection], *, store: Path, rejected: Path) -> Path | None:
    """Keep records refused before they reached the store (e.g. by `recflow publish`) in the rejected log, each
    once, in the store writers' turn; returns the file written (None: every one was logged already)."""
    if not rejections:
        return None
    with writer_lock(store):
        return write_rejected(rejections, Path(rejected))


@contextmanager
def writer_lock(store: Path) -> Iterator[None]:
    """The store's writer turn (see the module docstring); creates the store folder when missing."""
    store = Path(store)
    if not store.is_dir():
        store.mkdir(parents=True, exist_ok=True)
        fsync_dir(store.parent)
    with exclusive_lock(store / LOCK_FILE):
        yield


def scan_store(
    store: Path, columns: Sequence[str] | None = None, *, start: datetime | None = None, end: datetime | None = None
) -> pa.Table:
    """Every stored event (columns in STORE_SCHEMA order, or `columns`), partitions in date order; with `start`
    and/or `end`, only the events at or after start and before end, read from those dates' partitions."""
    names = list(STORE_SCHEMA.names if columns is None else columns)
    unknown = [c for c in names if c not in STORE_SCHEMA.names]
    if unknown:
        raise ValueError(f"unknown store column(s) {', '.join(unknown)}; the store has {', '.join(STORE_SCHEMA.names)}")
    files = _data_files(Path(store))
    if start is not None or end is not None:  # only the partitions of the window are read
        first = "date=0000" if start is None else f"date={start.astimezone(UTC).date().isoformat()}"
        last = "date=9999" if end is None else f"date={end.astimezone(UTC).date().isoformat()}"
        files = [f for f in files if first <= f.parent.name <= last]
    if not files:
        return STORE_SCHEMA.empty_table().select(names)
    when = ds.field(TIMESTAMP)
    window = None
    if start is not None:
        window = when >= pa.scalar(start, STORE_SCHEMA.field(TIMESTAMP).type)
    if end is not None:
        before = when < pa.scalar(end, STORE_SCHEMA.field(TIMESTAMP).type)
        window = before if window is None else window & before
    with reading(files, store):
        dataset = ds.dataset([str(f) for f in files], schema=STORE_SCHEMA, format="parquet")
        return dataset.to_table(columns=names, filter=window)


def store_span(store: Path) -> tuple[datetime, datetime] | None:
    """The time of the first and of the last stored event (None: the store is empty), read from the first
    and last date partitions only."""
    files = _data_files(Path(store))
    if not files:
        return None
    ends = [f for f in files if f.parent.name in (files[0].parent.name, files[-1].parent.name)]
    with reading(ends, store), duckdb_cursor() as con:
        query = f"SELECT epoch_ms(min({TIMESTAMP})), epoch_ms(max({TIMESTAMP})) FROM read_parquet($files)"
        [(first_ms, last_ms)] = con.sql(query, params={"files": [str(f) for f in ends]}).fetchall()
    return _EPOCH + timedelta(milliseconds=first_ms), _EPOCH + timedelta(milliseconds=last_ms)


def store_summary(store: Path) -> StoreSummary:
    """Counts and time range of the store, read from the files' user_id, item_id and timestamp columns."""
    files = _data_files(Path(store))
    if not files:
        return StoreSummary(events=0, users=0, items=0, first=None, last=None, partitions=0, files=0)
    with reading(files, store), duckdb_cursor() as con:
        query = (
            f"SELECT count(*), count(DISTINCT {USER_ID}), count(DISTINCT {ITEM_ID}), "
            f"epoch_ms(min({TIMESTAMP})), epoch_ms(max({TIMESTAMP})) FROM read_parquet($files)"
        )
        [(events, users, items, first_ms, last_ms)] = con.sql(
            query, params={"files": [str(f) for f in files]}
        ).fetchall()
    return StoreSummary(
        events=events,
        users=users,
        items=items,
        first=_EPOCH + timedelta(milliseconds=first_ms),
        last=_EPOCH + timedelta(milliseconds=last_ms),
        partitions=len({f.parent for f in files}),
        files=len(files),
    )


# -- one batch ---------------------------------------------------------------------------------------------


def _ingest_read(
    table: pa.Table,
    unreadable: list[Rejection],
    *,
    source: str,
    store: Path,
    rejected: Path,
    settings: EventSettings,
    now: datetime | None,
) -> IngestReport:
    """Validate and commit the rows read from one input (`eventio`), with the records it could not read."""
    batch = validate_table(table, settings=settings, source=source, now=now)
    rejections = sorted(unreadable + batch.rejected, key=lambda r: r.record) if unreadable else batch.rejected
    read = table.num_rows + len(unreadable)
    return _commit(batch.accepted, rejections, read=read, store=store, rejected=rejected, source=source,
                   ids_given=_brings_ids(table))  # fmt: skip


def _brings_ids(table: pa.Table) -> bool:
    """Whether some row of an input table gives its own event_id (else every id is derived from its row)."""
    if EVENT_ID not in table.column_names:
        return False
    ids = pc.cast(table[EVENT_ID], pa.string()) if not pa.types.is_string(table[EVENT_ID].type) else table[EVENT_ID]
    return bool(pc.any(pc.greater(pc.utf8_length(ids), 0)).as_py())


def _commit(
    accepted: pa.Table,
    rejections: list[Rejection],
    *,
    read: int,
    store: Path,
    rejected: Path,
    source: str,
    ids_given: bool,
) -> IngestReport:
    """Store the new events of one validated batch and write its rejected log (at the same time: Python
    renders the log while duckdb and pyarrow dedup and write), in the store's writer turn. If either fails the
    batch raises, and replaying it is safe. `ids_given`: some input rows gave their own event_id."""
    store = Path(store)
    explicit = _explicit_rows(accepted) if ids_given and accepted.num_rows else None  # before the turn: CPU
    with writer_lock(store), ThreadPoolExecutor(max_workers=1) as pool:
        log = pool.submit(write_rejected, rejections, Path(rejected)) if rejections else None
        new = _new_rows(accepted, store, explicit)
        stored = int(np.count_nonzero(new))
        if stored:
            _write_partitions(accepted, new, store, lists_explicit=explicit is not None and bool(explicit[new].any()))
        rejected_path = log.result() if log is not None else None
    report = IngestReport(
        read=read,
        stored=stored,
        duplicate=accepted.num_rows - stored,
        rejected=len(rejections),
        reasons=dict(Counter(r.code for r in rejections)),
        rejected_path=rejected_path,
    )
    logger.info("%s: %d read, %d stored, %d duplicate, %d rejected", source, report.read, report.stored,
                report.duplicate, report.rejected)  # fmt: skip
    return report


def _new_rows(batch: pa.Table, store: Path, explicit: np.ndarray | None) -> np.ndarray:
    """Which rows of `batch` have an event_id that is neither stored yet nor seen earlier in the batch.
    `explicit`: which rows carry an id that is not derived from their fields (None: none does)."""
    new = np.zeros(batch.num_rows, bool)
    if batch.num_rows:
        files = _collision_files(batch, store, explicit)
        rows, hashes = _unstored(batch[EVENT_ID], files, store)
        new[rows[_first_occurrences(batch[EVENT_ID], rows, hashes)]] = True
    return new


def _collision_files(batch: pa.Table, store: Path, explicit: np.ndarray | None) -> list[Path]:
    """The stored files that can hold an event_id of `batch` (see the module docstring)."""
    listed = _explicit_id_files(store)  # first: a store without the list gets it before anything is added
    if explicit is not None and explicit.any():
        return _data_files(store)
    folders = [store / f"date={_EPOCH_DAY + timedelta(days=day)}" for day in np.unique(_days(batch)).tolist()]
    files = {f for folder in folders for f in folder.glob("part-*.parquet")}
    return sorted(files | listed)


def _explicit_rows(batch: pa.Table) -> np.ndarray:
    """Which rows' event_id is not the one derived from their fields."""
    return np.asarray(pc.not_equal(batch[EVENT_ID], derive_event_ids(batch)).to_numpy(zero_copy_only=False), bool)


def _explicit_id_files(store: Path) -> set[Path]:
    """The files listed in `.explicit-id-files` that exist. A store without the list (written before it existed,
    or copied without it) gets it once, by reading every file."""
    listing = store / EXPLICIT_ID_FILES
    if not listing.exists():
        files = _data_files(store)
        with reading(files, store):
            found = [f for f in files if _explicit_rows(pq.read_table(f, schema=STORE_SCHEMA)).any()]
        logger.info("listed %d of %d files of %s as holding explicit event ids", len(found), len(files), store)
        _append_listing(listing, found, store)
    names = listing.read_text().splitlines()
    return {path for name in names if name and (path := store / name).is_file()}


def _append_listing(listing: Path, files: Sequence[Path], store: Path) -> None:
    """Add files to `.explicit-id-files` (created when missing), durably."""
    created = not listing.exists()
    with listing.open("a", encoding="utf-8") as out:
        out.write("".join(f"{f.relative_to(store).as_posix()}\n" for f in files))
        out.flush()
        os.fsync(out.fileno())
    if created:
        fsync_dir(store)


def _days(table: pa.Table) -> np.ndarray:
    """The UTC day (days since 1970-01-01) of every row."""
    return np.asarray(pc.cast(table[TIMESTAMP], pa.int64()).to_numpy()) // _DAY_MS


def _unstored(ids: pa.ChunkedArray, stored: Sequence[Path], store: Path) -> tuple[np.ndarray, np.ndarray]:
    """The rows (ascending) whose id is not in the `stored` files, and a 64-bit hash (uint64) of each of their ids."""
    files = [str(f) for f in stored]
    with reading(files, store), duckdb_cursor() as con:
        con.register("batch", pa.table({EVENT_ID: ids, "row": pa.array(np.arange(len(ids)))}))
        if files:
            query = (f"SELECT b.row, hash(b.{EVENT_ID}) AS h FROM batch b ANTI JOIN read_parquet($files) s "
                     f"ON b.{EVENT_ID} = s.{EVENT_ID}")  # fmt: skip
            found = con.sql(query, params={"files": files}).to_arrow_table()
        else:
            found = con.sql(f"SELECT row, hash({EVENT_ID}) AS h FROM batch").to_arrow_table()
    rows, hashes = found["row"].to_numpy(), found["h"].to_numpy()
    if files:  # a join returns rows in any order
        by_row = np.zeros(len(ids), np.uint64)
        by_row[rows] = hashes
        rows = np.sort(rows)
        hashes = by_row[rows]
    return rows, hashes


def _first_occurrences(ids: pa.ChunkedArray, rows: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Which of `rows` (ascending, with the hash of each one's id) hold the first occurrence of their id among
    `rows`, comparing ids exactly. Only the rows whose hash repeats are compared as strings: a row with a
    unique hash has a unique id. That is one hash per id instead of a hash table of all the strings."""
    first = np.ones(len(rows), bool)
    ordered = np.sort(hashes)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if len(repeated) == 0:
        return first
    slots = np.zeros(_HASH_SLOTS, bool)  # the low bits of the repeated hashes: a cheap first filter
    slots[repeated % _HASH_SLOTS] = True
    maybe = np.flatnonzero(slots[hashes % _HASH_SLOTS])
    maybe = maybe[np.isin(hashes[maybe], repeated)]
    # dictionary codes count distinct ids in order of first appearance: a row is first when its code is new
    codes = ids.take(rows[maybe]).combine_chunks().dictionary_encode().indices.to_numpy()
    seen = np.maximum.accumulate(codes)
    first[maybe] = np.concatenate([[True], seen[1:] > seen[:-1]])
    return first


def _write_partitions(table: pa.Table, keep: np.ndarray, store: Path, *, lists_explicit: bool) -> list[Path]:
    """Write the `keep` rows, one file per UTC date in time order, atomically (hidden name, then rename);
    returns the files, which are first added to `.explicit-id-files` when `lists_explicit`. The parallel writers
    cut their partition out of the batch themselves: a slice (filtered when it holds rows not to keep) when the
    kept rows are in time order, else a take of its rows. The files are named by `_digest`, which is computed
    while they are written."""
    day = _days(table)
    rows = np.flatnonzero(keep)
    in_order = not np.any(day[rows][1:] < day[rows][:-1])
    if not in_order:
        rows = rows[np.argsort(day[rows], kind="stable")]
    kept_day = day[rows]
    parts = np.split(rows, np.flatnonzero(kept_day[1:] != kept_day[:-1]) + 1)
    hidden = f".part-{uuid.uuid4().hex}.tmp"
    temps = [store / f"date={(_EPOCH_DAY + timedelta(days=int(day[part[0]]))).isoformat()}" / hidden for part in parts]

    def write(part: np.ndarray, temp: Path) -> None:
        if not in_order:
            _write_file(table.take(part), temp)
            return
        start, end = int(part[0]), int(part[-1]) + 1
        rows_in_range = table.slice(start, end - start)
        _write_file(
            rows_in_range if len(part) == end - start else rows_in_range.filter(pa.array(keep[start:end])), temp
        )

    for temp in temps:
        temp.parent.mkdir(parents=True, exist_ok=True)
    try:
        with ThreadPoolExecutor(max_workers=min(len(parts), os.cpu_count() or 1)) as pool:
            written = pool.map(write, parts, temps)
            ids = table[EVENT_ID] if in_order else table[EVENT_ID].take(rows)
            name = f"part-{_digest(ids, keep if in_order else None)}.parquet"
            list(written)
        finals = [temp.with_name(name) for temp in temps]
        if lists_explicit:  # before the files exist: a listed file that is missing is skipped
            _append_listing(store / EXPLICIT_ID_FILES, finals, store)
        for temp, final in zip(temps, finals, strict=True):
            os.replace(temp, final)
        for folder in {*(final.parent for final in finals), store}:  # the renames, and new date= folders
            fsync_dir(folder)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
    logger.debug("wrote %d rows to %d partitions of %s", len(rows), len(parts), store)
    return finals


def _digest(event_ids: pa.ChunkedArray, keep: np.ndarray | None = None) -> str:
    """A name for a batch's files that depends only on the events stored, so the same data step on another
    machine (a fresh clone) writes byte-identical files under identical names and `data.dvc` stays valid.
    Two different batches cannot share a digest: the second would have been deduplicated against the first.

    It hashes the kept ids (all when `keep` is None) as one string array would lay them out, offsets (int32,
    from 0) then characters, read from the chunks as they are: nothing is filtered or copied where every row
    of a chunk is kept."""
    lengths, characters = [], []
    done = 0
    for chunk in event_ids.chunks:
        n = len(chunk)
        if n == 0:
            continue
        _, offsets, data = chunk.buffers()
        bounds = np.frombuffer(offsets, np.int32, count=n + 1, offset=4 * chunk.offset)
        text = memoryview(data if data is not None else b"")[bounds[0] : bounds[-1]]
        sizes = np.diff(bounds)
        kept = None if keep is None else keep[done : done + n]
        done += n
        if kept is None or kept.all():
            lengths.append(sizes)
            characters.append(text)
        elif kept.any():
            lengths.append(sizes[kept])
            characters.append(memoryview(np.frombuffer(text, np.uint8)[np.repeat(kept, sizes)]))
    sizes = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype("<i4").tobytes())
    for text in characters:
        digest.update(text)
    return digest.hexdigest()


def _write_file(table: pa.Table, path: Path) -> None:
    with pa.OSFile(str(path), "wb") as sink:
        pq.write_table(table, sink, **_WRITE_OPTIONS)
    fsync_file(path)


# -- files -------------------------------------------------------------------------------------------------


def _expand(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in EVENT_FILE_SUFFIXES
                           and p.is_file() and not p.name.startswith("."))  # fmt: skip
            files += found
        elif not path.exists():
            raise InputFileError(f"{path} does not exist; give event files or folders that hold them")
        elif path.suffix.lower() not in EVENT_FILE_SUFFIXES:
            raise InputFileError(f"{path}: unknown file type; use one of {', '.join(EVENT_FILE_SUFFIXES)}")
        else:
            files.append(path)
    if not files:
        shown = ", ".join(str(p) for p in paths) or "(no paths given)"
        raise InputFileError(
            f"nothing to ingest in {shown}; expected {', '.join('*' + s for s in EVENT_FILE_SUFFIXES)}"
        )
    return files
