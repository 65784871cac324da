"""The event contract: the schemas of event tables, record validation, derived event ids.

Every input record ends up exactly once in `ValidatedBatch.accepted` or in `ValidatedBatch.rejected`.
The checks run in a fixed order and the first failing one names the record's rejection:

1. shape, field by field in FIELD_ORDER: `missing_field` (absent, null, or an empty action/timestamp),
   `wrong_type` (a list, object or bool where text or a number belongs);
2. content, field by field in FIELD_ORDER: `empty_id` / `id_too_long` (user_id, item_id), `unknown_action`,
   `bad_timestamp` / `naive_timestamp` / `future_timestamp`, `bad_value`, `id_too_long` (event_id).

Before those, reading a file (`eventio.read_event_file`) can reject a record as `bad_json`, `not_an_object`
(JSON lines) or `bad_row` (a CSV row with the wrong number of fields). Unknown extra fields are ignored.

Derived event ids. An event without `event_id` gets
`"h" + md5(key).hexdigest()[:24]` (96 bits) with the UTF-8 key
`f"{len(user_id.encode())}:{user_id}\\x1f{len(item_id.encode())}:{item_id}\\x1f{action}\\x1f{ms}\\x1f{bits}"`,
where `ms` is the UTC timestamp in epoch milliseconds and `bits` is the value's IEEE-754 float64 bit pattern
as a signed 64-bit decimal (`struct.unpack("<q", struct.pack("<d", value))[0]`), empty when value is null.
MD5 is a fixed standard, so the id is stable across recflow, pyarrow and duckdb versions, and any client can
compute it; a replayed event always gets the same id and is stored once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import repeat
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recflow.config import EventSettings
from recflow.constants import ACTION, EVENT_ID, ITEM_ID, REQUIRED_COLUMNS, TIMESTAMP, USER_ID, VALUE

logger = logging.getLogger(__name__)

TIMESTAMP_TYPE = pa.timestamp("ms", tz="UTC")
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
FIELD_ORDER = (USER_ID, ITEM_ID, ACTION, TIMESTAMP, VALUE, EVENT_ID)
# eventio.read_event_file adds these: the record number of each row and, for JSON, the line as written.
RECORD_COLUMN = "__record__"
RAW_COLUMN = "__raw__"
MAX_RAW_CHARS = 2000

REJECTION_CODES = (
    "bad_json", "not_an_object", "bad_row", "missing_field", "wrong_type", "empty_id", "id_too_long",
    "unknown_action", "bad_timestamp", "naive_timestamp", "future_timestamp", "bad_value",
)  # fmt: skip
_CODE = {name: i + 1 for i, name in enumerate(REJECTION_CODES)}
_EXPECTED = {
    USER_ID: "a string (or an integer)",
    ITEM_ID: "a string (or an integer)",
    EVENT_ID: "a string (or an integer)",
    ACTION: "a string",
    TIMESTAMP: "an ISO-8601 string with offset or a number of epoch seconds/milliseconds",
    VALUE: "a number or null",
}
_ISO_OFFSET = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}(:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}(:?\d{2})?)$"
_ISO_NAIVE = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}(:\d{2}(:\d{2}(\.\d+)?)?)?)?$"
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_MS_ABOVE = 1e11  # epoch numbers above this are milliseconds, below it seconds
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_MS = (datetime(1, 1, 2, tzinfo=UTC) - _EPOCH) // timedelta(milliseconds=1)
_MAX_MS = (datetime(9999, 12, 31, tzinfo=UTC) - _EPOCH) // timedelta(milliseconds=1)
_OK, _BAD, _NAIVE = 0, 1, 2
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
            return [text[:MAX_RAW_CHARS] for text in _take(table[RAW_COLUMN], rows).to_pylist()]
        shown = table.drop_columns([c for c in (RECORD_COLUMN,) if c in table.column_names])
        return [text[:MAX_RAW_CHARS] for text in json_objects(_take(shown, rows)).to_pylist()]

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
        raw_of=lambda rows: [_dumps(records[kept[i]]) for i in rows],
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
            "v": pc.cast(pa.array(bits, mask=_np(pc.is_null(value))), pa.string()),
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
        problem = _shape_problem(record)
        if problem is None:
            kept.append(position)
            for name in FIELD_ORDER:
                columns[name].append(_as_text(record.get(name)))
            continue
        raw = raws[number] if raws is not None else _dumps(record)
        rejected.append(Rejection(source, number, problem[0], problem[1], raw[:MAX_RAW_CHARS]))
    table = pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})
    table = table.append_column(RECORD_COLUMN, pa.array([numbers[i] for i in kept], pa.int64()))
    if raws is not None:
        table = table.append_column(RAW_COLUMN, pa.array([raws[numbers[i]] for i in kept], pa.string()))
    return table, rejected, kept


def _shape_problem(record: Any) -> tuple[str, str] | None:
    if not isinstance(record, Mapping):
        kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(record), "number")
        return "not_an_object", f"record is a JSON {kind}, not an object; send one object per event"
    for name in FIELD_ORDER:
        value = record.get(name)
        if value is None or (value == "" and name in (ACTION, TIMESTAMP)):
            if name in REQUIRED_COLUMNS:
                return "missing_field", _missing_reason(name)
            continue
        if isinstance(value, str):
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (number and (name in (TIMESTAMP, VALUE) or (name in _IDS and isinstance(value, int)))):
            return "wrong_type", _wrong_type_reason(name, value)
    return None


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return repr(float(value)) if isinstance(value, float) else str(value)


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
    cols = {name: _plain(table[name]) if name in table.column_names else pa.nulls(n) for name in FIELD_ORDER}
    limit_ms = (now - _EPOCH) // timedelta(milliseconds=1) + int(settings.max_future_skew_seconds * 1000)

    def check(start: int) -> _Checked:
        part = {name: col.slice(start, _SLICE) for name, col in cols.items()}
        code, field, ms, values, no_value = _check_rows(part, settings, limit_ms)
        kept = {name: _text(part[name]) for name in (EVENT_ID, USER_ID, ITEM_ID, ACTION)}
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
        if not _type_allowed(name, col.type):
            fail(_np(pc.is_valid(col)), name, "wrong_type")
        if name in REQUIRED_COLUMNS:
            empty = _np(pc.equal(col, "")) if name in (ACTION, TIMESTAMP) and _is_text(col.type) else False
            fail(_np(pc.is_null(col)) | empty, name, "missing_field")
    for name in (USER_ID, ITEM_ID):  # 2. content
        text = _text(cols[name])
        length = pc.utf8_length(text)
        fail(_np(pc.or_(pc.equal(length, 0), pc.utf8_is_space(text))), name, "empty_id")
        fail(_np(pc.greater(length, settings.max_id_length)), name, "id_too_long")
    actions = pa.array(list(settings.actions), pa.string())
    fail(~_np(pc.is_in(_text(cols[ACTION]), value_set=actions)), ACTION, "unknown_action")
    ms, status = _parse_timestamps(cols[TIMESTAMP])
    fail(status == _BAD, TIMESTAMP, "bad_timestamp")
    fail(status == _NAIVE, TIMESTAMP, "naive_timestamp")
    fail(ms > limit_ms, TIMESTAMP, "future_timestamp")
    values, no_value = _parse_values(cols[VALUE])
    fail(~no_value & ~np.isfinite(values), VALUE, "bad_value")
    fail(_np(pc.greater(pc.utf8_length(_text(cols[EVENT_ID])), settings.max_id_length)), EVENT_ID, "id_too_long")
    return code, field, ms, values, no_value


def _fill_event_ids(accepted: pa.Table) -> pa.Table:
    """`accepted` with a derived event_id wherever none was given (null or empty), cast to STORE_SCHEMA."""
    given = accepted[EVENT_ID]
    derive = _np(pc.or_kleene(pc.is_null(given), pc.equal(given, "")))
    if derive.all():
        given = derive_event_ids(accepted)
    elif derive.any():
        derived = derive_event_ids(accepted.filter(pa.array(derive)))
        given = pc.replace_with_mask(given.combine_chunks(), pa.array(derive), derived.combine_chunks())
    return accepted.set_column(0, STORE_SCHEMA.field(EVENT_ID), given).cast(STORE_SCHEMA)


_IDS = (USER_ID, ITEM_ID, EVENT_ID)


def _type_allowed(name: str, kind: pa.DataType) -> bool:
    if pa.types.is_null(kind) or _is_text(kind):
        return True
    if name in _IDS:
        return pa.types.is_integer(kind)
    if name == TIMESTAMP:
        return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_temporal(kind)
    if name == VALUE:
        return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
    return False


def _text(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """An id or action column as text: integers as decimals, a column of a wrong type as nulls."""
    usable = _is_text(col.type) or pa.types.is_integer(col.type) or pa.types.is_null(col.type)
    return pc.cast(col, pa.string()) if usable else pa.nulls(len(col), pa.string())


def _parse_timestamps(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Epoch milliseconds (UTC) and a status (_OK, _BAD, _NAIVE) for each row; null rows read as 0, _OK."""
    n = len(col)
    ms, status = np.zeros(n, np.int64), np.zeros(n, np.int8)
    kind = col.type
    valid = _np(pc.is_valid(col))
    if pa.types.is_timestamp(kind) and kind.tz is not None:
        ms = _np(pc.cast(col, TIMESTAMP_TYPE, safe=False).cast(pa.int64()), 0)
    elif pa.types.is_temporal(kind):  # a timestamp without zone, a date
        status[valid] = _NAIVE
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind):
        ms, status = _epoch_ms(_np(pc.cast(col, pa.float64()), 0.0))
    elif _is_text(kind):
        col = pc.cast(col, pa.string())
        try:  # the common case: every timestamp is ISO-8601 with an offset
            return _np(pc.cast(col, TIMESTAMP_TYPE).cast(pa.int64()), 0), status
        except pa.ArrowInvalid:
            pass  # sort the strings by form, cheapest test first
        col = _contiguous(col)  # for the takes below
        digits = valid & _np(pc.ascii_is_decimal(col)) & _np(pc.less_equal(pc.utf8_length(col), 15))
        todo = valid & ~digits
        at = np.flatnonzero(digits)
        ms[at], status[at] = _epoch_ms(_np(pc.cast(col.take(at), pa.float64())))
        at = np.flatnonzero(todo & _np(pc.ends_with(col, "Z")))
        try:  # most of the rest usually ends in Z
            ms[at] = _np(pc.cast(col.take(at), TIMESTAMP_TYPE).cast(pa.int64()))
            todo[at] = False
        except pa.ArrowInvalid:
            pass
        at = np.flatnonzero(todo)
        some = col.take(at)
        offset, naive, number = (_np(pc.match_substring_regex(some, p)) for p in (_ISO_OFFSET, _ISO_NAIVE, _NUMBER))
        status[at] = np.where(naive, _NAIVE, _BAD)
        ms[at[number]], status[at[number]] = _epoch_ms(_np(pc.cast(some.filter(pa.array(number)), pa.float64())))
        ms[at[offset]], ok = _cast_iso(some.filter(pa.array(offset)))
        status[at[offset]] = np.where(ok, _OK, _BAD)
    return ms, status


def _epoch_ms(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore", over="ignore"):
        ms = np.rint(np.where(np.abs(x) > _MS_ABOVE, x, x * 1000.0))
        ok = np.isfinite(ms) & (ms >= _MIN_MS) & (ms <= _MAX_MS)
    return np.where(ok, ms, 0).astype(np.int64), np.where(ok, _OK, _BAD).astype(np.int8)


def _cast_iso(strings: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Parse ISO-8601 strings that carry an offset. When pyarrow rejects some (Feb 30, nanoseconds, ...),
    blocks of 1024 are retried and a failing block is parsed one string at a time."""
    ms, ok = np.zeros(len(strings), np.int64), np.ones(len(strings), bool)
    try:
        return _np(pc.cast(strings, TIMESTAMP_TYPE).cast(pa.int64()), 0), ok
    except pa.ArrowInvalid:
        pass
    for start in range(0, len(strings), 1024):
        block = strings.slice(start, 1024)
        try:
            ms[start : start + len(block)] = _np(pc.cast(block, TIMESTAMP_TYPE).cast(pa.int64()))
            continue
        except pa.ArrowInvalid:
            pass
        for i, text in enumerate(block.to_pylist(), start):
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                moment = None
            if moment is None or moment.tzinfo is None:
                ok[i] = False
            else:
                ms[i] = (moment - _EPOCH) // timedelta(milliseconds=1)
    return ms, ok


def _parse_values(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """value as float64 (NaN where absent) and where it is absent (null or "")."""
    n = len(col)
    if _is_text(col.type):
        col = _contiguous(pc.cast(col, pa.string()))
        at = np.flatnonzero(_np(pc.greater(pc.utf8_length(col), 0)))
        some = col.take(at)
        try:
            numbers = _np(pc.cast(some, pa.float64()))
        except pa.ArrowInvalid:
            looks = _np(pc.match_substring_regex(some, _NUMBER))
            numbers = np.full(len(at), np.nan)
            numbers[looks] = _np(pc.cast(some.filter(pa.array(looks)), pa.float64()))
        values, absent = np.full(n, np.nan), np.ones(n, bool)
        values[at], absent[at] = numbers, False
        return values, absent
    if _type_allowed(VALUE, col.type) and not pa.types.is_null(col.type):
        return _np(pc.cast(col, pa.float64()), np.nan), _np(pc.is_null(col))
    return np.full(n, np.nan), np.ones(n, bool)


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
    contiguous: dict[str, pa.Array] = {}  # each column concatenated once, not once per group
    for f, c in sorted(set(zip(fields.tolist(), codes.tolist(), strict=True))):
        at = np.flatnonzero((fields == f) & (codes == c))
        name = FIELD_ORDER[f]
        if name not in contiguous:
            contiguous[name] = _contiguous(cols[name])
        values = contiguous[name].take(rows[at]).to_pylist()
        reasons[at] = _reason_texts(REJECTION_CODES[c - 1], name, values, ms[at], settings, now)
    return reasons.tolist()


def _reason_texts(
    code: str, name: str, values: list[Any], ms: np.ndarray, settings: EventSettings, now: datetime
) -> list[str]:
    if code == "missing_field":
        return [_missing_reason(name)] * len(values)
    if code == "wrong_type":
        return [_wrong_type_reason(name, value) for value in values]
    if code == "empty_id":
        return [f"{name} is empty or blank; give a non-empty id"] * len(values)
    if code == "id_too_long":
        limit = f"more than {settings.max_id_length} (params.yaml: events.max_id_length)"
        return [f"{name} has {len(str(value))} characters, {limit}: {_show(value)}" for value in values]
    if code == "unknown_action":
        known = f"is not one of {', '.join(settings.actions)} (params.yaml: events.actions)"
        return [f"action {_show(value)} {known}" for value in values]
    if code == "naive_timestamp":
        fix = "has no UTC offset; add Z or +HH:MM (recflow never guesses a timezone)"
        return [f"timestamp {_show(value)} {fix}" for value in values]
    if code == "future_timestamp":
        skew = f"events.max_future_skew_seconds={settings.max_future_skew_seconds:g} (params.yaml)"
        utc_now = now.astimezone(UTC)
        texts = []
        for value, moment in zip(values, (_EPOCH + timedelta(milliseconds=m) for m in ms.tolist()), strict=True):
            ahead = (moment - utc_now).total_seconds()
            texts.append(f"timestamp {_show(value)} ({moment.isoformat()}) is {ahead:.0f} s after now "
                         f"({utc_now.isoformat()}), more than {skew}; check the sender's clock")  # fmt: skip
        return texts
    if code == "bad_value":
        fix = "is not a finite number; give a number (rating, quantity, seconds) or leave it out"
        return [f"value {_show(value)} {fix}" for value in values]
    fix = (
        "is not a date-time; give ISO-8601 with an offset (2024-05-01T12:00:00Z, 2024-05-01T14:00:00+02:00) "
        "or epoch seconds or milliseconds"
    )
    return [f"timestamp {_show(value)} {fix}" for value in values]


def _missing_reason(name: str) -> str:
    return f"{name} is missing; every event needs {', '.join(REQUIRED_COLUMNS)}"


def _wrong_type_reason(name: str, value: Any) -> str:
    return f"{name} must be {_EXPECTED[name]}, got {type(value).__name__} {_show(value)}"


# -- small helpers ---------------------------------------------------------------------------------------


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dumps(record: Any) -> str:
    return json.dumps(record, ensure_ascii=False, default=str)[:MAX_RAW_CHARS]


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _plain(col: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.cast(col, col.type.value_type) if pa.types.is_dictionary(col.type) else col


def _contiguous(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """`col` as one array, to take from it: a take from a ChunkedArray concatenates its chunks on every call."""
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _take(data: pa.ChunkedArray | pa.Table, rows: np.ndarray) -> pa.Array | pa.Table:
    """`data.take(rows)` for sorted `rows`, concatenating only the chunks between the first and the last row."""
    if len(rows) == 0:
        return data.take(rows)
    span = data.slice(int(rows[0]), int(rows[-1]) - int(rows[0]) + 1)
    return span.combine_chunks().take(rows - rows[0])


def _np(arr: pa.ChunkedArray | pa.Array, fill: Any = False) -> np.ndarray:
    """A pyarrow array as numpy, nulls replaced by `fill` (False for masks)."""
    filled = pc.fill_null(arr, fill) if arr.null_count else arr
    if isinstance(filled, pa.ChunkedArray):
        filled = filled.combine_chunks() if filled.num_chunks != 1 else filled.chunk(0)
    return filled.to_numpy(zero_copy_only=False)
