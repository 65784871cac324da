"""The event contract's batch execution: the schemas of event tables, whole-column validation, derived event ids.

The rules (their order, codes, reasons and the derived event id) are stated once in `recflow.events.rules`; this
module applies them to Arrow columns of any type, in slices on all cores, for files of millions of rows, and derives
event ids in duckdb. `recflow.events.rowwise` applies the same rules to a request's few records without Arrow
compute or SQL. Reading timestamps and values out of columns of any Arrow type lives in `recflow.events.parse`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recflow.config import EventSettings
from recflow.constants import ACTION, EVENT_ID, ITEM_ID, REQUIRED_COLUMNS, TIMESTAMP, USER_ID, VALUE
from recflow.events.parse import (
    BAD,
    ID_FIELDS,
    NAIVE,
    TIMESTAMP_TYPE,
    contiguous,
    is_text,
    parse_timestamps,
    parse_values,
    plain,
    take,
    text_column,
    to_numpy,
    type_allowed,
)
from recflow.events.rules import (
    CONTENT_RULES,
    FIELD_ORDER,
    MAX_RAW_CHARS,
    REJECTION_CODES,
    as_text,
    dumps,
    future_limit_ms,
    reason,
    shape_problem,
)

logger = logging.getLogger(__name__)

# What importers and the synthetic generator produce: the contract's columns and types, no event_id yet.
EVENT_SCHEMA = pa.schema(
    [
        pa.field(USER_ID, pa.string()),
        pa.field(ITEM_ID, pa.string()),
        pa.field(ACTION, pa.string()),
        pa.field(TIMESTAMP, TIMESTAMP_TYPE),
        pa.field(VALUE, pa.float64()),
    ]
)
# What the store holds: every event validated, with its event_id.
STORE_SCHEMA = pa.schema(
    [
        pa.field(EVENT_ID, pa.string(), nullable=False),
        pa.field(USER_ID, pa.string(), nullable=False),
        pa.field(ITEM_ID, pa.string(), nullable=False),
        pa.field(ACTION, pa.string(), nullable=False),
        pa.field(TIMESTAMP, TIMESTAMP_TYPE, nullable=False),
        pa.field(VALUE, pa.float64()),
    ]
)
# eventio.read_event_file adds these: the record number of each row and, for JSON, the line as written.
RECORD_COLUMN = "__record__"
RAW_COLUMN = "__raw__"
_CODE = {name: i + 1 for i, name in enumerate(REJECTION_CODES)}
_SLICE = 1 << 18  # rows checked per task; slices run on all cores
_INLINE_ROWS = 10_000  # smaller batches are checked without a thread pool
_DUCKDB: tuple[int, duckdb.DuckDBPyConnection] | None = None  # (pid, database), see duckdb_cursor
_DUCKDB_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class Rejection:
    """One record that was not stored, and why."""

    source: str  # file path, or "request" etc.
    record: int  # 1-based: JSON line number, CSV data row (header not counted), Parquet row, list position
    code: str  # one of REJECTION_CODES
    reason: str  # names the field and the bad value and says how to fix it
    raw: str  # the record as text (the JSON line; other rows re-serialised as a JSON object), <= 2000 chars


@dataclass
class ValidatedBatch:
    accepted: pa.Table  # STORE_SCHEMA, event_id filled in
    rejected: list[Rejection]


def validate_table(
    table: pa.Table,
    *,
    settings: EventSettings,
    source: str,
    now: datetime | None = None,
    record_offset: int = 0,
) -> ValidatedBatch:
    """Check every row of `table` against the event contract. Rows are numbered `record_offset + 1, ...`
    unless the table carries RECORD_COLUMN (as tables from `eventio.read_event_file` do)."""
    if RECORD_COLUMN in table.column_names:
        records = np.asarray(table[RECORD_COLUMN].to_numpy(), dtype=np.int64)
    else:
        records = np.arange(record_offset + 1, record_offset + table.num_rows + 1, dtype=np.int64)

    def raw_of(rows: np.ndarray) -> list[str]:
        if RAW_COLUMN in table.column_names:
            return [text[:MAX_RAW_CHARS] for text in take(table[RAW_COLUMN], rows).to_pylist()]
        shown = table.drop_columns([c for c in (RECORD_COLUMN,) if c in table.column_names])
        return [text[:MAX_RAW_CHARS] for text in json_objects(take(shown, rows)).to_pylist()]

    return _validate(table, settings=settings, source=source, now=now, records=records, raw_of=raw_of)


def validate_records(
    records: Sequence[Mapping[str, Any]],
    *,
    settings: EventSettings,
    source: str = "request",
    now: datetime | None = None,
) -> ValidatedBatch:
    """Validate JSON-decoded records (the HTTP service's path). Never raises for bad input: a record of the
    wrong shape or type is a Rejection numbered by its 1-based position."""
    table, rejected, kept = records_table(records, range(1, len(records) + 1), source=source)
    batch = _validate(
        table,
        settings=settings,
        source=source,
        now=now,
        records=np.asarray(table[RECORD_COLUMN].to_numpy(), dtype=np.int64),
        raw_of=lambda rows: [dumps(records[kept[i]]) for i in rows],
    )
    batch.rejected = sorted(rejected + batch.rejected, key=lambda r: r.record)
    return batch


def derive_event_ids(events: pa.Table) -> pa.ChunkedArray:
    """The deterministic event id of every row of `events` (STORE_SCHEMA columns; see the module docstring)."""
    value = events[VALUE]
    bits = np.asarray(value.to_numpy(zero_copy_only=False), dtype=np.float64).view(np.int64)
    keys = pa.table(
        {
            "u": events[USER_ID],
            "i": events[ITEM_ID],
            "a": events[ACTION],
            "t": pc.cast(events[TIMESTAMP], pa.int64()),
            "v": pc.cast(pa.array(bits, mask=to_numpy(pc.is_null(value))), pa.string()),
        }
    )
    key = "concat(strlen(u), ':', u, chr(31), strlen(i), ':', i, chr(31), a, chr(31), t, chr(31), coalesce(v, ''))"
    with duckdb_cursor() as con:
        con.register("keys", keys)
        return con.sql(f"SELECT 'h' || substr(md5({key}), 1, 24) AS id FROM keys").to_arrow_table()["id"]


def json_objects(table: pa.Table) -> pa.ChunkedArray:
    """Each row of `table` as the text of a compact JSON object (duckdb's to_json: escapes, any column type)."""
    alias = "row"
    while alias in table.column_names:  # a column of that name would shadow the row
        alias += "_"
    with duckdb_cursor() as con:
        con.register("rows", table)
        return con.sql(f'SELECT to_json("{alias}") AS j FROM rows AS "{alias}"').to_arrow_table()["j"]


def duckdb_cursor() -> duckdb.DuckDBPyConnection:
    """A new cursor on recflow's in-memory DuckDB (UTC, rows kept in order), which is opened on first use in
    each process: opening a database takes ~50 ms, a cursor ~0.1 ms. Use a cursor in one thread and close it
    (`with duckdb_cursor() as con:`); tables registered on it are visible to it alone."""
    global _DUCKDB
    with _DUCKDB_LOCK:
        if _DUCKDB is None or _DUCKDB[0] != os.getpid():  # a forked child must not share its parent's
            database = duckdb.connect(config={"preserve_insertion_order": True})
            database.execute("SET GLOBAL TimeZone = 'UTC'")  # once the bundled icu extension has loaded
            _DUCKDB = (os.getpid(), database)
        return _DUCKDB[1].cursor()


def records_table(
    records: Sequence[Any],
    numbers: Sequence[int],
    *,
    source: str,
    raws: Mapping[int, str] | None = None,
) -> tuple[pa.Table, list[Rejection], list[int]]:
    """Check the shape of JSON-decoded records (object, required fields present, acceptable types) and
    turn the rest into a table of text columns for `validate_table`, with RECORD_COLUMN from `numbers` (and
    RAW_COLUMN from `raws`, the text of each record by number, when given). Returns the table, the
    rejections and, for each table row, the position of its record in `records`."""
    columns: dict[str, list[Any]] = {name: [] for name in FIELD_ORDER}
    rejected: list[Rejection] = []
    kept: list[int] = []
    for position, (number, record) in enumerate(zip(numbers, records, strict=True)):
        problem = shape_problem(record)
        if problem is None:
            kept.append(position)
            for name in FIELD_ORDER:
                columns[name].append(as_text(record.get(name)))
            continue
        raw = raws[number] if raws is not None else dumps(record)
        rejected.append(Rejection(source, number, problem[0], problem[1], raw[:MAX_RAW_CHARS]))
    table = pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})
    table = table.append_column(RECORD_COLUMN, pa.array([numbers[i] for i in kept], pa.int64()))
    if raws is not None:
        table = table.append_column(RAW_COLUMN, pa.array([raws[numbers[i]] for i in kept], pa.string()))
    return table, rejected, kept


# -- validation ------------------------------------------------------------------------------------------


def _validate(
    table: pa.Table,
    *,
    settings: EventSettings,
    source: str,
    now: datetime | None,
    records: np.ndarray,
    raw_of: Callable[[np.ndarray], list[str]],
) -> ValidatedBatch:
    now = datetime.now(UTC) if now is None else now
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware, e.g. datetime.now(UTC)")
    n = table.num_rows
    cols = {name: plain(table[name]) if name in table.column_names else pa.nulls(n) for name in FIELD_ORDER}
    limit_ms = future_limit_ms(now, settings)

    def check(start: int) -> _Checked:
        part = {name: col.slice(start, _SLICE) for name, col in cols.items()}
        code, field, ms, values, no_value = _check_rows(part, settings, limit_ms)
        kept = {name: text_column(part[name]) for name in (EVENT_ID, USER_ID, ITEM_ID, ACTION)}
        kept_ms = ms
        if code.any():  # when every row is accepted, nothing is copied
            keep = code == 0
            kept = {name: pc.filter(text, pa.array(keep)) for name, text in kept.items()}
            kept_ms, values, no_value = ms[keep], values[keep], no_value[keep]
        accepted = pa.table(
            {**kept, TIMESTAMP: pa.array(kept_ms).cast(TIMESTAMP_TYPE), VALUE: pa.array(values, mask=no_value)}
        )
        return _Checked(start, part, code, field, ms, accepted)

    def explain(checked: _Checked) -> list[Rejection]:
        rows = np.flatnonzero(checked.code)
        if not len(rows):
            return []
        code = checked.code[rows]
        reasons = _reasons(checked.cols, rows, code, checked.field[rows], checked.ms[rows], settings, now)
        codes = np.array(REJECTION_CODES, dtype=object)[code - 1].tolist()
        at = checked.start + rows
        return list(map(Rejection, repeat(source), records[at].tolist(), codes, reasons, raw_of(at)))

    starts = range(0, max(n, 1), _SLICE)
    if n < _INLINE_ROWS:  # a thread pool would cost more than it saves
        slices = [check(start) for start in starts]
        rejected = [rejection for checked in slices for rejection in explain(checked)]
        accepted = pa.concat_tables([_fill_event_ids(checked.accepted) for checked in slices])
    else:  # the pool checks the slices, then derives their ids in duckdb, while this thread explains rejections
        with ThreadPoolExecutor(max_workers=min(len(starts), os.cpu_count() or 1)) as pool:
            with_ids, rejected = [], []
            for checked in pool.map(check, starts):
                with_ids.append(pool.submit(_fill_event_ids, checked.accepted))
                rejected += explain(checked)
            accepted = pa.concat_tables([future.result() for future in with_ids])
    if rejected:
        logger.debug("%s: %d of %d records rejected", source, len(rejected), n)
    return ValidatedBatch(accepted=accepted, rejected=rejected)


@dataclass(frozen=True, slots=True)
class _Checked:
    """One checked slice of a batch: its columns, each row's rejection code (0: accepted) and failing field, its
    timestamp in epoch ms, and the accepted rows (event ids not derived yet)."""

    start: int
    cols: dict[str, pa.ChunkedArray | pa.Array]
    code: np.ndarray
    field: np.ndarray
    ms: np.ndarray
    accepted: pa.Table


def _check_rows(
    cols: Mapping[str, pa.ChunkedArray | pa.Array], settings: EventSettings, limit_ms: int
) -> tuple[np.ndarray, ...]:
    """The rejection code (0: accepted) and failing field of each row of a slice, with its timestamp in
    epoch ms and its value (NaN and no_value where absent)."""
    n = len(cols[USER_ID])
    code, field = np.zeros(n, np.int8), np.zeros(n, np.int8)

    def fail(bad: np.ndarray, name: str, rule: str) -> None:
        hit = (code == 0) & bad
        code[hit], field[hit] = _CODE[rule], FIELD_ORDER.index(name)

    for name in FIELD_ORDER:  # 1. shape
        col = cols[name]
        if not type_allowed(name, col.type):
            fail(to_numpy(pc.is_valid(col)), name, "wrong_type")
        if name in REQUIRED_COLUMNS:
            empty = to_numpy(pc.equal(col, "")) if name in (ACTION, TIMESTAMP) and is_text(col.type) else False
            fail(to_numpy(pc.is_null(col)) | empty, name, "missing_field")
    texts = {name: text_column(cols[name]) for name in ID_FIELDS}
    lengths = {name: pc.utf8_length(text) for name, text in texts.items()}
    ms, status = parse_timestamps(cols[TIMESTAMP])
    values, no_value = parse_values(cols[VALUE])
    actions = pa.array(list(settings.actions), pa.string())
    broken: dict[str, Callable[[str], np.ndarray]] = {  # 2. content: each rule of CONTENT_RULES over a column
        "empty_id": lambda name: to_numpy(pc.or_(pc.equal(lengths[name], 0), pc.utf8_is_space(texts[name]))),
        "id_too_long": lambda name: to_numpy(pc.greater(lengths[name], settings.max_id_length)),
        "unknown_action": lambda name: ~to_numpy(pc.is_in(text_column(cols[name]), value_set=actions)),
        "bad_timestamp": lambda name: status == BAD,
        "naive_timestamp": lambda name: status == NAIVE,
        "future_timestamp": lambda name: ms > limit_ms,
        "bad_value": lambda name: ~no_value & ~np.isfinite(values),
    }
    for name, rule in CONTENT_RULES:
        fail(broken[rule](name), name, rule)
    return code, field, ms, values, no_value


def _fill_event_ids(accepted: pa.Table) -> pa.Table:
    """`accepted` with a derived event_id wherever none was given (null or empty), cast to STORE_SCHEMA."""
    given = accepted[EVENT_ID]
    derive = to_numpy(pc.or_kleene(pc.is_null(given), pc.equal(given, "")))
    if derive.all():
        given = derive_event_ids(accepted)
    elif derive.any():
        derived = derive_event_ids(accepted.filter(pa.array(derive)))
        given = pc.replace_with_mask(given.combine_chunks(), pa.array(derive), derived.combine_chunks())
    return accepted.set_column(0, STORE_SCHEMA.field(EVENT_ID), given).cast(STORE_SCHEMA)


def _reasons(
    cols: Mapping[str, Any],
    rows: np.ndarray,
    codes: np.ndarray,
    fields: np.ndarray,
    ms: np.ndarray,
    settings: EventSettings,
    now: datetime,
) -> list[str]:
    """The reason text of each rejected row, built per (field, code) group."""
    reasons = np.empty(len(rows), dtype=object)
    joined: dict[str, pa.Array] = {}  # each column concatenated once, not once per group
    for f, c in sorted(set(zip(fields.tolist(), codes.tolist(), strict=True))):
        at = np.flatnonzero((fields == f) & (codes == c))
        name = FIELD_ORDER[f]
        if name not in joined:
            joined[name] = contiguous(cols[name])
        values = joined[name].take(rows[at]).to_pylist()
        code = REJECTION_CODES[c - 1]
        reasons[at] = [
            reason(code, name, v, settings, ms=m, now=now) for v, m in zip(values, ms[at].tolist(), strict=True)
        ]
    return reasons.tolist()
