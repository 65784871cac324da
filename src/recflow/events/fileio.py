"""Event files: read .jsonl/.json, .csv and .parquet files into rows for `events.validate_table`, and write
event tables as .parquet, .csv or .jsonl.

Reading never validates: it only turns a file into a table (CSV cells as text, so that validation decides
about types) plus the records that could not even be read as rows, each a `Rejection` with its record number:
`bad_json`, `not_an_object` (JSON lines) or `bad_row` (a CSV row with the wrong number of fields). Writing is
atomic (`recflow.files.atomic_path`: a hidden temporary file, then a rename), with timestamps as ISO-8601 + 'Z'
in text formats.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from recflow.constants import EVENT_ID, REQUIRED_COLUMNS, TIMESTAMP, VALUE
from recflow.errors import InputFileError
from recflow.events.contract import RAW_COLUMN, RECORD_COLUMN, Rejection, records_table
from recflow.events.rules import FIELD_ORDER, MAX_RAW_CHARS
from recflow.files import atomic_path

logger = logging.getLogger(__name__)

EVENT_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # what read_event_file reads
WRITE_FORMATS = (".parquet", ".csv", ".jsonl")  # what write_events writes


def read_event_file(path: Path) -> tuple[pa.Table, list[Rejection]]:
    """The raw rows of one .jsonl/.json (one object per line), .csv or .parquet file, and the records that
    could not even be read as rows. The table carries RECORD_COLUMN (and RAW_COLUMN for JSON) for
    `events.validate_table`. CSV cells are read as text so that validation decides about types."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EVENT_FILE_SUFFIXES:
        raise InputFileError(f"{path}: unknown file type {suffix!r}; use one of {', '.join(EVENT_FILE_SUFFIXES)}")
    if not path.is_file():
        raise InputFileError(f"{path} does not exist or is not a file; check the path")
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise InputFileError(f"{path} is not a readable Parquet file ({exc}); rewrite it or remove it") from exc
        _require_columns(path, table.column_names)
        return table.append_column(RECORD_COLUMN, pa.array(np.arange(1, table.num_rows + 1))), []
    return _read_json_lines(path)


def write_events(table: pa.Table, path: Path) -> None:
    """Write events by extension (.parquet, .csv, .jsonl), atomically; CSV/JSONL timestamps as ISO-8601 + 'Z'."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITE_FORMATS:
        raise InputFileError(
            f"cannot write events to {path}: unknown extension {suffix!r}; use {', '.join(WRITE_FORMATS)}"
        )
    with atomic_path(path) as tmp:
        if suffix == ".parquet":
            pq.write_table(table, tmp)
        elif suffix == ".csv":
            pcsv.write_csv(_iso_timestamps(table), tmp)
        else:
            with tmp.open("wb") as out:
                for batch in _iso_timestamps(table).to_batches(max_chunksize=500_000):
                    out.write(_json_lines(batch))
    logger.info("wrote %d events to %s", table.num_rows, path)


# -- reading -------------------------------------------------------------------------------------------------


def _require_columns(path: Path, names: Sequence[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise InputFileError(
            f"{path} has no column {', '.join(missing)} (found: {', '.join(names) or 'nothing'}); "
            f"an event file needs {', '.join(REQUIRED_COLUMNS)} and may add {EVENT_ID}, {VALUE}"
        )


def _read_csv(path: Path) -> tuple[pa.Table, list[Rejection]]:
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as handle:
        header = next(csv.reader(handle), [])
    _require_columns(path, header)
    bad_rows: list[Any] = []

    def skip(row: Any) -> str:
        bad_rows.append(row)
        return "skip"

    def read(use_threads: bool) -> pa.Table:
        bad_rows.clear()
        return pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(use_threads=use_threads),
            parse_options=pcsv.ParseOptions(invalid_row_handler=skip),
            convert_options=pcsv.ConvertOptions(column_types={name: pa.string() for name in header}),
        )

    try:
        table = read(use_threads=True)
        if bad_rows:  # only a single-threaded read knows the line numbers of malformed rows
            table = read(use_threads=False)
    except (pa.ArrowException, OSError) as exc:
        raise InputFileError(f"{path} is not a readable CSV file ({exc}); check its encoding and quoting") from exc
    rejected = [
        Rejection(
            str(path),
            row.number - 1,
            "bad_row",
            f"CSV row has {row.actual_columns} fields but the header has {row.expected_columns}; "
            "quote values that contain commas",
            row.text[:MAX_RAW_CHARS],
        )
        for row in bad_rows
    ]
    numbers = np.arange(1, table.num_rows + len(rejected) + 1)
    numbers = np.setdiff1d(numbers, [r.record for r in rejected]) if rejected else numbers
    return table.append_column(RECORD_COLUMN, pa.array(numbers)), rejected


def _read_json_lines(path: Path) -> tuple[pa.Table, list[Rejection]]:
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    if data.lstrip()[:1] == b"[":
        raise InputFileError(f"{path} holds a JSON array; write one JSON object per line (JSON Lines) instead")
    return read_json_lines(data, source=str(path))


def read_json_lines(data: bytes, *, source: str) -> tuple[pa.Table, list[Rejection]]:
    """`read_event_file` for JSON Lines already in memory (the event stream's batches): the rows, numbered by
    line, and the lines that could not be read as rows, as Rejections from `source`."""
    try:
        lines = pc.list_flatten(pc.split_pattern(pa.array([data.decode()], pa.large_string()), "\n"))
        lines = pc.cast(pc.utf8_rtrim(lines, "\r"), pa.string())
        blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(lines)), 0).to_numpy(zero_copy_only=False)
        filled = np.flatnonzero(~blank)
        raw, numbers = lines.take(filled), pa.array(filled + 1)
        table = _fast_json(data, raw)
        if table is not None:
            return table.append_column(RECORD_COLUMN, numbers).append_column(RAW_COLUMN, raw), []
    except UnicodeDecodeError:
        pass
    logger.debug("%s: mixed field types or bad lines, parsing line by line", source)
    records: list[Any] = []
    rejected: list[Rejection] = []
    numbers_kept: list[int] = []
    raws: dict[int, str] = {}
    for number, chunk in enumerate(data.split(b"\n"), 1):
        line = raws[number] = chunk.decode(errors="replace").rstrip("\r")
        if not line.strip():
            continue
        try:
            records.append(json.loads(chunk))
            numbers_kept.append(number)
        except ValueError as exc:
            detail = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            reason = f"line is not valid JSON ({detail}); write one JSON object per line"
            rejected.append(Rejection(source, number, "bad_json", reason, line[:MAX_RAW_CHARS]))
    table, shape_rejected, _ = records_table(records, numbers_kept, source=source, raws=raws)
    return table, sorted(rejected + shape_rejected, key=lambda r: r.record)


def _fast_json(data: bytes, lines: pa.Array) -> pa.Table | None:
    """pyarrow's JSON reader, with column types guessed from the first line; None when the file needs the
    slow path (a line that is not an object, mixed types, ...)."""
    if len(lines) == 0:
        return None
    try:
        first = json.loads(lines[0].as_py())
    except json.JSONDecodeError:
        return None
    if not isinstance(first, dict):
        return None

    def kind(name: str) -> pa.DataType:
        sample = first.get(name)
        number = isinstance(sample, int | float) and not isinstance(sample, bool)
        if (name == VALUE and not isinstance(sample, str)) or (name == TIMESTAMP and number):
            return pa.float64()
        return pa.int64() if isinstance(sample, int) and not isinstance(sample, bool) else pa.string()

    schema = pa.schema([(name, kind(name)) for name in FIELD_ORDER])
    options = pjson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    try:
        table = pjson.read_json(io.BytesIO(data), parse_options=options)
    except pa.ArrowException:
        return None
    return table if table.num_rows == len(lines) else None


# -- writing -------------------------------------------------------------------------------------------------


def _iso_timestamps(table: pa.Table) -> pa.Table:
    """Timestamp columns as ISO-8601 strings in UTC with a 'Z' (the store rejects naive timestamps)."""
    for index, field in enumerate(table.schema):
        if pa.types.is_timestamp(field.type):
            if field.type.tz is None:
                raise InputFileError(f"column {field.name} has no time zone; cast it to UTC before writing")
            table = table.set_column(index, field.name, _iso_utc(table.column(index).combine_chunks()))
    return table


def _iso_utc(array: pa.Array) -> pa.Array:
    """Fixed-width "2024-01-01T10:00:00.000Z" strings written byte by byte (pc.strftime is ~10x slower)."""
    digits = {"s": 0, "ms": 3, "us": 6, "ns": 9}[array.type.unit]
    seconds, fraction = np.divmod(array.cast(pa.int64()).fill_null(0).to_numpy(), 10**digits)
    days, second = np.divmod(seconds, 86_400)
    first = int(days.min()) if len(days) else 0
    span = int(days.max()) - first + 1 if len(days) else 1
    if span > 10**6 or first < -719_528 or first + span > 2_932_897:  # beyond 0000-9999 or too spread: Arrow
        return pc.strftime(array.cast(pa.timestamp(array.type.unit, tz="UTC")), format="%Y-%m-%dT%H:%M:%SZ")
    width = 20 + digits + (digits > 0)
    chars = np.empty((len(days), width), dtype=np.uint8)
    dates = np.datetime_as_string(np.arange(first, first + span).astype("datetime64[D]")).astype("S10")
    chars[:, :10] = np.frombuffer(dates.tobytes(), dtype=np.uint8).reshape(span, 10)[days - first]
    for at, text in ((10, "T"), (13, ":"), (16, ":"), (19, "." if digits else "Z"), (width - 1, "Z")):
        chars[:, at] = ord(text)
    for at, value, size in (
        (11, second // 3600, 2),
        (14, second // 60 % 60, 2),
        (17, second % 60, 2),
        (20, fraction, digits),
    ):
        value = value.astype(np.int32)
        for k in range(size):
            chars[:, at + k] = value // 10 ** (size - 1 - k) % 10 + 48
    offsets = np.arange(len(days) + 1, dtype=np.int64) * width
    text = pa.LargeStringArray.from_buffers(len(days), pa.py_buffer(offsets), pa.py_buffer(chars))
    return pc.if_else(array.is_valid(), text, pa.scalar(None, text.type)) if array.null_count else text


def _json_lines(batch: pa.RecordBatch) -> memoryview:
    """One JSON object per row, built with Arrow string kernels (strings escaped as JSON requires)."""
    if batch.num_columns == 0 or batch.num_rows == 0:
        return memoryview(b"{}\n" * batch.num_rows)
    text_type = pa.large_string()
    parts: list[pa.Array | pa.Scalar] = []
    for index, field in enumerate(batch.schema):
        column = batch.column(index)
        text = column.cast(text_type)
        if pa.types.is_floating(field.type):  # NaN and infinities are not JSON: null
            text = pc.if_else(pc.is_finite(column), text, pa.scalar(None, text_type))
        elif not (pa.types.is_integer(field.type) or pa.types.is_boolean(field.type)):
            text = pc.replace_substring(pc.replace_substring(text, "\\", "\\\\"), '"', '\\"')
            if pc.any(pc.match_substring_regex(text, r"[\x00-\x1f]")).as_py():  # rare: control characters
                for code in range(32):
                    text = pc.replace_substring(text, chr(code), f"\\u{code:04x}")
            quote = pa.scalar('"', text_type)
            text = pc.binary_join_element_wise(quote, text, quote, pa.scalar("", text_type))
        key = ("," if index else "{") + json.dumps(field.name) + ":"
        parts += [pa.scalar(key, text_type), pc.fill_null(text, pa.scalar("null", text_type))]
    lines = pc.binary_join_element_wise(*parts, pa.scalar("}\n", text_type), pa.scalar("", text_type))
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int64)[lines.offset : lines.offset + len(lines) + 1]
    return memoryview(lines.buffers()[2])[offsets[0] : offsets[-1]]
