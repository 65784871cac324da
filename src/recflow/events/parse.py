"""Reading the event contract's columns from Arrow data of any type: timestamps to UTC epoch milliseconds and values
to floats, each row with a status, and the small Arrow-to-numpy helpers the validation (`recflow.events.contract`) uses.
Vectorised: a batch of a million rows is parsed without a Python loop, except for the odd ISO-8601 string that
pyarrow rejects. `timestamp_of_text` and `value_of_text` read one string the same way, for the row-wise validation
(`recflow.events.rowwise`); tests/unit/test_rowwise.py holds them to the columns' results."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recflow.constants import EVENT_ID, ITEM_ID, TIMESTAMP, USER_ID, VALUE

TIMESTAMP_TYPE = pa.timestamp("ms", tz="UTC")
ISO_OFFSET = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}(:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}(:?\d{2})?)$"
ISO_NAIVE = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}(:\d{2}(:\d{2}(\.\d+)?)?)?)?$"
NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
MS_ABOVE = 1e11  # epoch numbers above this are milliseconds, below it seconds
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_MS = (datetime(1, 1, 2, tzinfo=UTC) - EPOCH) // timedelta(milliseconds=1)
MAX_MS = (datetime(9999, 12, 31, tzinfo=UTC) - EPOCH) // timedelta(milliseconds=1)
OK, BAD, NAIVE = 0, 1, 2  # a timestamp's status: parsed, unreadable, without an offset
ID_FIELDS = (USER_ID, ITEM_ID, EVENT_ID)
# the same patterns for one string: \d is ASCII in pyarrow's RE2, and fullmatch leaves no "$ before a newline"
_ISO_OFFSET, _ISO_NAIVE, _NUMBER = (re.compile(p, re.ASCII).fullmatch for p in (ISO_OFFSET, ISO_NAIVE, NUMBER))


def type_allowed(name: str, kind: pa.DataType) -> bool:
    """Whether a column of this Arrow type can hold the field (text always can; ids also as integers)."""
    if pa.types.is_null(kind) or is_text(kind):
        return True
    if name in ID_FIELDS:
        return bool(pa.types.is_integer(kind))
    if name == TIMESTAMP:
        return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_temporal(kind))
    if name == VALUE:
        return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind))
    return False


def text_column(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """An id or action column as text: integers as decimals, a column of a wrong type as nulls."""
    usable = is_text(col.type) or pa.types.is_integer(col.type) or pa.types.is_null(col.type)
    return pc.cast(col, pa.string()) if usable else pa.nulls(len(col), pa.string())


def parse_timestamps(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Epoch milliseconds (UTC) and a status (OK, BAD, NAIVE) for each row; null rows read as 0, OK. An instant
    outside MIN_MS..MAX_MS is BAD whatever its form (a datetime cannot hold it: the service's event log failed on
    "0001-01-01T00:00:00+02:01")."""
    ms, status = _parse_timestamps(col)
    status[(status == OK) & ((ms < MIN_MS) | (ms > MAX_MS)) & to_numpy(pc.is_valid(col))] = BAD
    return ms, status


def _parse_timestamps(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    n = len(col)
    ms, status = np.zeros(n, np.int64), np.zeros(n, np.int8)
    kind = col.type
    valid = to_numpy(pc.is_valid(col))
    if pa.types.is_timestamp(kind) and kind.tz is not None:
        ms = to_numpy(pc.cast(col, TIMESTAMP_TYPE, safe=False).cast(pa.int64()), 0)
    elif pa.types.is_temporal(kind):  # a timestamp without zone, a date
        status[valid] = NAIVE
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind):
        ms, status = epoch_ms(to_numpy(pc.cast(col, pa.float64()), 0.0))
    elif is_text(kind):
        col = pc.cast(col, pa.string())
        try:  # the common case: every timestamp is ISO-8601 with an offset
            return to_numpy(pc.cast(col, TIMESTAMP_TYPE).cast(pa.int64()), 0), status
        except pa.ArrowInvalid:
            pass  # sort the strings by form, cheapest test first
        col = contiguous(col)  # for the takes below
        digits = valid & to_numpy(pc.ascii_is_decimal(col)) & to_numpy(pc.less_equal(pc.utf8_length(col), 15))
        todo = valid & ~digits
        at = np.flatnonzero(digits)
        ms[at], status[at] = epoch_ms(to_numpy(pc.cast(col.take(at), pa.float64())))
        at = np.flatnonzero(todo & to_numpy(pc.ends_with(col, "Z")))
        try:  # most of the rest usually ends in Z
            ms[at] = to_numpy(pc.cast(col.take(at), TIMESTAMP_TYPE).cast(pa.int64()))
            todo[at] = False
        except pa.ArrowInvalid:
            pass
        at = np.flatnonzero(todo)
        some = col.take(at)
        offset, naive, number = (to_numpy(pc.match_substring_regex(some, p)) for p in (ISO_OFFSET, ISO_NAIVE, NUMBER))
        status[at] = np.where(naive, NAIVE, BAD)
        ms[at[number]], status[at[number]] = epoch_ms(to_numpy(pc.cast(some.filter(pa.array(number)), pa.float64())))
        ms[at[offset]], ok = cast_iso(some.filter(pa.array(offset)))
        status[at[offset]] = np.where(ok, OK, BAD)
    return ms, status


def epoch_ms(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore", over="ignore"):
        ms = np.rint(np.where(np.abs(x) > MS_ABOVE, x, x * 1000.0))
        ok = np.isfinite(ms) & (ms >= MIN_MS) & (ms <= MAX_MS)
    return np.where(ok, ms, 0).astype(np.int64), np.where(ok, OK, BAD).astype(np.int8)


def cast_iso(strings: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Parse ISO-8601 strings that carry an offset. When pyarrow rejects some (Feb 30, nanoseconds, ...),
    blocks of 1024 are retried and a failing block is parsed one string at a time."""
    ms, ok = np.zeros(len(strings), np.int64), np.ones(len(strings), bool)
    try:
        return to_numpy(pc.cast(strings, TIMESTAMP_TYPE).cast(pa.int64()), 0), ok
    except pa.ArrowInvalid:
        pass
    for start in range(0, len(strings), 1024):
        block = strings.slice(start, 1024)
        try:
            ms[start : start + len(block)] = to_numpy(pc.cast(block, TIMESTAMP_TYPE).cast(pa.int64()))
            continue
        except pa.ArrowInvalid:
            pass
        for i, text in enumerate(block.to_pylist(), start):
            parsed = iso_ms(text)
            ok[i] = parsed is not None
            ms[i] = parsed or 0
    return ms, ok


def iso_ms(text: str) -> int | None:
    """Epoch milliseconds of an ISO-8601 string with an offset (Python's reading, which agrees with pyarrow's wherever
    pyarrow reads one and also takes more than 3 decimals), None when it is not one."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return None if moment.tzinfo is None else (moment - EPOCH) // timedelta(milliseconds=1)


def timestamp_of_text(text: str) -> tuple[int, int]:
    """`parse_timestamps` of one non-empty string: (epoch ms, status), without Arrow."""
    if _ISO_OFFSET(text):
        ms = iso_ms(text)
        ms, status = (0, BAD) if ms is None else (ms, OK)
    elif _ISO_NAIVE(text):
        return 0, NAIVE
    elif _NUMBER(text):  # digits alone, too
        ms, status = epoch_ms_of(float(text))
    else:
        return 0, BAD
    return (ms, status) if status != OK or MIN_MS <= ms <= MAX_MS else (ms, BAD)


def epoch_ms_of(x: float) -> tuple[int, int]:
    """`epoch_ms` of one number."""
    ms = x if abs(x) > MS_ABOVE else x * 1000.0
    if not math.isfinite(ms) or not MIN_MS <= round(ms) <= MAX_MS:
        return 0, BAD
    return round(ms), OK


def value_of_text(text: str) -> float | None:
    """`parse_values` of one string: None when absent (""), NaN when it is not a number."""
    if not text:
        return None
    return float(text) if _NUMBER(text) else math.nan


def parse_values(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """value as float64 (NaN where absent) and where it is absent (null or "")."""
    n = len(col)
    if is_text(col.type):
        col = contiguous(pc.cast(col, pa.string()))
        at = np.flatnonzero(to_numpy(pc.greater(pc.utf8_length(col), 0)))
        some = col.take(at)
        try:
            numbers = to_numpy(pc.cast(some, pa.float64()))
        except pa.ArrowInvalid:
            looks = to_numpy(pc.match_substring_regex(some, NUMBER))
            numbers = np.full(len(at), np.nan)
            numbers[looks] = to_numpy(pc.cast(some.filter(pa.array(looks)), pa.float64()))
        values, absent = np.full(n, np.nan), np.ones(n, bool)
        values[at], absent[at] = numbers, False
        return values, absent
    if type_allowed(VALUE, col.type) and not pa.types.is_null(col.type):
        return to_numpy(pc.cast(col, pa.float64()), np.nan), to_numpy(pc.is_null(col))
    return np.full(n, np.nan), np.ones(n, bool)


def is_text(kind: pa.DataType) -> bool:
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind))


def plain(col: pa.ChunkedArray) -> pa.ChunkedArray:
    return pc.cast(col, col.type.value_type) if pa.types.is_dictionary(col.type) else col


def contiguous(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """`col` as one array, to take from it: a take from a ChunkedArray concatenates its chunks on every call."""
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def take(data: pa.ChunkedArray | pa.Table, rows: np.ndarray) -> pa.Array | pa.Table:
    """`data.take(rows)` for sorted `rows`, concatenating only the chunks between the first and the last row."""
    if len(rows) == 0:
        return data.take(rows)
    span = data.slice(int(rows[0]), int(rows[-1]) - int(rows[0]) + 1)
    return span.combine_chunks().take(rows - rows[0])


def to_numpy(arr: pa.ChunkedArray | pa.Array, fill: Any = False) -> np.ndarray:
    """A pyarrow array as numpy, nulls replaced by `fill` (False for masks)."""
    filled = pc.fill_null(arr, fill) if arr.null_count else arr
    if isinstance(filled, pa.ChunkedArray):
        filled = filled.combine_chunks() if filled.num_chunks != 1 else filled.chunk(0)
    array: np.ndarray = filled.to_numpy(zero_copy_only=False)
    return array
