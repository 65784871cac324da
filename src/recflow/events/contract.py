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

Reading timestamps and values out of columns of any Arrow type lives in `recflow.events.parse`.
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
from recflow.events.parse import (
    BAD,
    EPOCH,
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
        if not (number and (name in (TIMESTAMP, VALUE) or (name in ID_FIELDS and isinstance(value, int)))):
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
    cols = {name: plain(table[name]) if name in table.column_names else pa.nulls(n) for name in FIELD_ORDER}
    limit_ms = (now - EPOCH) // timedelta(milliseconds=1) + int(settings.max_future_skew_seconds * 1000)

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
    for name in (USER_ID, ITEM_ID):  # 2. content
        text = text_column(cols[name])
        length = pc.utf8_length(text)
        fail(to_numpy(pc.or_(pc.equal(length, 0), pc.utf8_is_space(text))), name, "empty_id")
        fail(to_numpy(pc.greater(length, settings.max_id_length)), name, "id_too_long")
    actions = pa.array(list(settings.actions), pa.string())
    fail(~to_numpy(pc.is_in(text_column(cols[ACTION]), value_set=actions)), ACTION, "unknown_action")
    ms, status = parse_timestamps(cols[TIMESTAMP])
    fail(status == BAD, TIMESTAMP, "bad_timestamp")
    fail(status == NAIVE, TIMESTAMP, "naive_timestamp")
    fail(ms > limit_ms, TIMESTAMP, "future_timestamp")
    values, no_value = parse_values(cols[VALUE])
    fail(~no_value & ~np.isfinite(values), VALUE, "bad_value")
    fail(
        to_numpy(pc.greater(pc.utf8_length(text_column(cols[EVENT_ID])), settings.max_id_length)),
        EVENT_ID,
        "id_too_long",
    )
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
        for value, moment in zip(values, (EPOCH + timedelta(milliseconds=m) for m in ms.tolist()), strict=True):
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


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dumps(record: Any) -> str:
    return json.dumps(record, ensure_ascii=False, default=str)[:MAX_RAW_CHARS]
