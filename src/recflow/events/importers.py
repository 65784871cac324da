"""Importers from public dataset formats to the event contract (columns and types of `events.EVENT_SCHEMA`).

Importers convert formats; they do not validate business rules (id length, known actions, future
timestamps): the store does that and rejects records with a reason. They never drop a row silently: a row
that cannot be converted (wrong number of fields, a number that is not a number, a timestamp without an
offset) raises `InputFileError` naming its line, and an empty field becomes null, which the store rejects.
Line numbers count the header line and skip blank lines, as pyarrow does.

MovieLens ratings become actions by the floor of the rating (`DEFAULT_RATING_ACTIONS`): 0-2 -> view,
3 -> click, 4 -> add_to_cart, 5 -> purchase, so a higher rating weighs more in the interaction matrix
(params.yaml: events.actions); `value` keeps the rating itself.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from recflow.constants import ACTION, EVENT_COLUMNS, EVENT_ID, ITEM_ID, REQUIRED_COLUMNS, TIMESTAMP, USER_ID, VALUE
from recflow.errors import InputFileError
from recflow.events.contract import EVENT_SCHEMA
from recflow.events.parse import TIMESTAMP_TYPE

logger = logging.getLogger(__name__)

DEFAULT_RATING_ACTIONS: Mapping[int, str] = {
    0: "view",
    1: "view",
    2: "view",
    3: "click",
    4: "add_to_cart",
    5: "purchase",
}
RETAILROCKET_ACTIONS: Mapping[str, str] = {"view": "view", "addtocart": "add_to_cart", "transaction": "purchase"}
MOVIELENS_FILES = ("u.data", "ratings.csv", "ratings.dat")
TIMESTAMP_UNITS = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "ns": 1e-6}  # multiply by this to get milliseconds

_MOVIELENS_CSV = ("userId", "movieId", "rating", "timestamp")
_RETAILROCKET_CSV = ("timestamp", "visitorid", "event", "itemid")
_KIND = {pa.int64(): "an integer", pa.float64(): "a number"}
_NUMBER = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$")


def import_movielens(path: Path, *, rating_actions: Mapping[int, str] | None = None) -> pa.Table:
    """MovieLens ratings (ml-100k u.data, ml-1m ratings.dat, ml-latest ratings.csv, or a folder holding one).

    value = rating; action = `rating_actions[floor(rating)]` (default `DEFAULT_RATING_ACTIONS`).
    """
    path = _locate(Path(path), MOVIELENS_FILES, "a MovieLens ratings file")
    first = _first_line(path)
    names = ["user", "item", "rating", "ts"]
    types = {"user": pa.string(), "item": pa.string(), "rating": pa.float64(), "ts": pa.int64()}
    has_header = False
    if "::" in first:  # ml-1m ratings.dat: user::item::rating::timestamp, read as ':'-separated with empty fields
        table = _read(path, names=["user", "_1", "item", "_2", "rating", "_3", "ts"], delimiter=":", types=types)
    elif "\t" in first:  # ml-100k u.data
        table = _read(path, names=names, delimiter="\t", types=types)
    elif "," in first:
        header = [name.strip() for name in first.split(",")]
        if not set(_MOVIELENS_CSV) <= set(header):
            raise InputFileError(
                f"{path}: a MovieLens CSV needs the header {','.join(_MOVIELENS_CSV)}; it has {','.join(header)}"
            )
        csv_types = dict(zip(_MOVIELENS_CSV, types.values(), strict=True))
        table = _read(path, types=csv_types).rename_columns(names)
        has_header = True
    else:
        raise InputFileError(
            f"{path}: unknown MovieLens format (first line {first[:80]!r}); expected tab-separated u.data, "
            f"'::'-separated ratings.dat or ratings.csv with header {','.join(_MOVIELENS_CSV)}"
        )
    rating = table.column("rating")
    mapping = {
        int(k): str(v) for k, v in (DEFAULT_RATING_ACTIONS if rating_actions is None else rating_actions).items()
    }
    floor = np.floor(rating.to_numpy(zero_copy_only=False))  # null ratings become NaN and stay null
    known = np.isnan(floor) | np.isin(floor, list(mapping))
    if not known.all():
        row = int(np.flatnonzero(~known)[0])
        raise InputFileError(
            f"{path}, line {row + 1 + has_header}: rating {rating[row].as_py()} has no action (rating_actions maps "
            f"{sorted(mapping)}); pass rating_actions with an entry for {int(floor[row])}"
        )
    keys = np.array(sorted(mapping), dtype=np.float64)
    codes = np.searchsorted(keys, np.nan_to_num(floor, nan=keys[0]))
    action = pa.array([mapping[int(k)] for k in keys]).take(pa.array(codes, mask=np.isnan(floor)))
    timestamp = _epoch_to_ms(table.column("ts"), 1000, path)
    logger.info("read %d MovieLens ratings from %s", table.num_rows, path)
    return _events(table.column("user"), table.column("item"), action, timestamp, rating)


def import_retailrocket(path: Path) -> pa.Table:
    """RetailRocket events.csv (timestamp ms, visitorid, event, itemid, transactionid) or a folder holding it.

    view -> view, addtocart -> add_to_cart, transaction -> purchase; any other event is passed through unchanged
    for the store to reject. value is null.
    """
    path = _locate(Path(path), ("events.csv",), "a RetailRocket events.csv")
    _require_columns(path, _header(path), _RETAILROCKET_CSV, "RetailRocket events.csv")
    types = {"timestamp": pa.int64(), "visitorid": pa.string(), "event": pa.string(), "itemid": pa.string()}
    table = _read(path, types=types, include=list(_RETAILROCKET_CSV))
    action = _map_values(table.column("event"), RETAILROCKET_ACTIONS, path)
    timestamp = _epoch_to_ms(table.column("timestamp"), 1, path)
    logger.info("read %d RetailRocket events from %s", table.num_rows, path)
    return _events(table.column("visitorid"), table.column("itemid"), action, timestamp, None)


def import_mapped_csv(
    path: Path,
    mapping: Mapping[str, str],
    *,
    action_map: Mapping[str, str] | None = None,
    timestamp_unit: str | None = None,
    delimiter: str = ",",
) -> pa.Table:
    """Any CSV with a header, given which column holds each contract field (see `parse_mapping`).

    A mapping value "=text" is a constant (e.g. action "=purchase" when the source has no action column).
    `action_map` renames source actions (unmapped ones pass through for the store to judge). Timestamps are
    ISO-8601 with an offset, or epoch numbers in `timestamp_unit` (s, ms, us, ns); without a unit each number's
    magnitude decides (< 1e11 seconds, < 1e14 ms, < 1e17 us, else ns). An event_id column is kept when mapped.
    """
    path = _locate(Path(path), (), "a CSV file")
    _check_mapping(mapping)
    if timestamp_unit is not None and timestamp_unit not in TIMESTAMP_UNITS:
        raise InputFileError(f"timestamp unit {timestamp_unit!r} is not one of {', '.join(TIMESTAMP_UNITS)}")
    sources = sorted({column for column in mapping.values() if not column.startswith("=")})
    _require_columns(path, _header(path, delimiter), sources, "the mapped CSV")
    table = _read(path, delimiter=delimiter, types=dict.fromkeys(sources, pa.string()), include=sources)

    def field(name: str) -> pa.ChunkedArray:
        source = mapping[name]
        if source.startswith("="):
            return pa.chunked_array([pa.repeat(pa.scalar(source[1:]), table.num_rows)])
        return table.column(source)

    action = field(ACTION)
    if action_map:
        action = _map_values(action, action_map, path)
    columns = {
        USER_ID: field(USER_ID),
        ITEM_ID: field(ITEM_ID),
        ACTION: action,
        TIMESTAMP: _parse_timestamps(field(TIMESTAMP), timestamp_unit, path, mapping[TIMESTAMP]),
        VALUE: _parse_numbers(field(VALUE), path, mapping[VALUE]) if VALUE in mapping else None,
    }
    result = _events(*columns.values())
    if EVENT_ID in mapping:
        result = result.append_column(EVENT_ID, field(EVENT_ID))
    logger.info("read %d events from %s", result.num_rows, path)
    return result


def parse_mapping(text: Sequence[str], *, contract_fields: bool = True) -> dict[str, str]:
    """CLI pairs to a mapping, e.g. ["user_id=customer", "action==purchase"] (a value starting with "=" is a constant).

    Gives {"user_id": "customer", "action": "=purchase"}. Fields are checked against the contract (unless
    `contract_fields` is False, for action renames such as ["buy=purchase"]); completeness is checked by
    `import_mapped_csv`.
    """
    mapping: dict[str, str] = {}
    for entry in text:
        name, sep, column = entry.partition("=")
        name, column = name.strip(), column.strip()
        if not sep or not name or not column:
            raise InputFileError(
                f"bad mapping {entry!r}: expected FIELD=COLUMN, e.g. user_id=customer, or action==purchase for a "
                "constant action"
            )
        if name in mapping:
            raise InputFileError(f"mapping names {name!r} twice ({mapping[name]!r} and {column!r}); keep one")
        mapping[name] = column
    if contract_fields:
        _check_mapping(mapping, complete=False)
    return mapping


def _check_mapping(mapping: Mapping[str, str], *, complete: bool = True) -> None:
    unknown = sorted(set(mapping) - set(EVENT_COLUMNS))
    if unknown:
        raise InputFileError(
            f"unknown contract field(s) {', '.join(unknown)} in the mapping; fields are {', '.join(EVENT_COLUMNS)}"
        )
    missing = [name for name in REQUIRED_COLUMNS if name not in mapping]
    if complete and missing:
        raise InputFileError(
            f"the mapping has no {', '.join(missing)}; add FIELD=COLUMN for each ({', '.join(REQUIRED_COLUMNS)} "
            "are required; a constant is written FIELD==VALUE)"
        )


def _locate(path: Path, names: Sequence[str], what: str) -> Path:
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        looked_for = f" without {' or '.join(names)}" if names else ""
        raise InputFileError(f"{path} is a folder{looked_for}; pass the path of {what}")
    if not path.is_file():
        raise InputFileError(f"{path} does not exist; pass the path of {what}")
    return path


def _first_line(path: Path) -> str:
    with pa.input_stream(str(path), compression="detect") as stream:
        raw = stream.read(64 * 1024)
    line: list[str] = raw.decode("utf-8", errors="replace").lstrip("\ufeff").splitlines()
    if not line:
        raise InputFileError(f"{path} is empty")
    return line[0]


def _header(path: Path, delimiter: str = ",") -> list[str]:
    line = _first_line(path)
    try:
        only_header = pacsv.read_csv(
            pa.BufferReader(f"{line}\n".encode()), parse_options=pacsv.ParseOptions(delimiter=delimiter)
        )
    except pa.ArrowInvalid as exc:
        raise InputFileError(
            f"{path}: cannot read a CSV header ({exc}); the first line must name the columns"
        ) from None
    names: list[str] = only_header.schema.names
    return names


def _require_columns(path: Path, present: Sequence[str], needed: Sequence[str], what: str) -> None:
    missing = [name for name in needed if name not in present]
    if missing:
        raise InputFileError(f"{path}: {what} needs column(s) {', '.join(missing)}; the file has {', '.join(present)}")


def _read(
    path: Path,
    *,
    types: Mapping[str, pa.DataType],
    names: Sequence[str] | None = None,
    delimiter: str = ",",
    include: Sequence[str] | None = None,
    threads: bool = True,
) -> pa.Table:
    """pyarrow.csv.read_csv that raises InputFileError naming the line of a malformed or unconvertible row."""
    bad: list[pacsv.InvalidRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        bad.append(row)
        return "skip"

    read = pacsv.ReadOptions(column_names=list(names) if names else None, use_threads=threads)
    parse = pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid)
    wanted = list(include) if include is not None else [n for n in types if not n.startswith("_")]
    convert = pacsv.ConvertOptions(column_types=dict(types), include_columns=wanted)
    try:
        table = pacsv.read_csv(str(path), read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as exc:
        if "conversion error" not in str(exc):
            raise InputFileError(f"{path}: cannot read as CSV: {exc}") from None
        raise _conversion_error(path, exc, types, names, delimiter, wanted) from None
    if bad:
        if bad[0].number is None:  # multi-threaded reads do not know line numbers: read again to find it
            return _read(path, types=types, names=names, delimiter=delimiter, include=include, threads=False)
        row = bad[0]
        raise InputFileError(
            f"{path}, line {row.number}: {row.actual_columns} field(s) where {row.expected_columns} were expected "
            f"({row.text[:120]!r}); fix or remove that line ({len(bad)} malformed line(s) in all)"
        )
    return table


def _conversion_error(
    path: Path,
    exc: pa.ArrowInvalid,
    types: Mapping[str, pa.DataType],
    names: Sequence[str] | None,
    delimiter: str,
    wanted: list[str],
) -> InputFileError:
    """Re-read the file as text and find the first value that does not convert, with its line."""
    as_text = dict.fromkeys(wanted, pa.string())
    text = pacsv.read_csv(
        str(path),
        read_options=pacsv.ReadOptions(column_names=list(names) if names else None, use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter=delimiter),
        convert_options=pacsv.ConvertOptions(column_types=as_text, include_columns=wanted, strings_can_be_null=True),
    )
    for name in wanted:
        if types[name] == pa.string():
            continue
        row = _first_failure(text.column(name).combine_chunks(), types[name])
        if row is not None:
            value = text.column(name)[row].as_py()
            return InputFileError(
                f"{path}, line {row + 1 + (names is None)}: column {name!r} has {value!r}, which is not "
                f"{_KIND.get(types[name], types[name])}; fix or remove that line"
            )
    return InputFileError(f"{path}: {exc}")


def _first_failure(values: pa.Array, target: pa.DataType) -> int | None:
    """Index of the first value that does not cast to `target` (bisection over slices; no Python row loop)."""

    def fails(array: pa.Array) -> bool:
        try:
            array.cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return True
        return False

    if not fails(values):
        return None
    low, high = 0, len(values)
    while high - low > 1:
        middle = (low + high) // 2
        if fails(values.slice(low, middle - low)):
            high = middle
        else:
            low = middle
    return low


def _map_values(values: pa.ChunkedArray, mapping: Mapping[str, str], path: Path) -> pa.Array:
    """Rename each distinct value through `mapping`; values it does not name pass through unchanged."""
    encoded = values.combine_chunks().dictionary_encode()
    distinct = encoded.dictionary.to_pylist()
    unmapped = sorted(str(v) for v in distinct if v not in mapping and v is not None)
    if unmapped:
        logger.warning("%s: action(s) %s have no mapping and pass through unchanged", path, ", ".join(unmapped))
    renamed = pa.array([mapping.get(v, v) for v in distinct], pa.string())
    return renamed.take(encoded.indices)


def _epoch_to_ms(values: pa.ChunkedArray, to_ms: int, path: Path) -> pa.ChunkedArray:
    try:
        return pc.multiply_checked(values, to_ms).cast(TIMESTAMP_TYPE)
    except pa.ArrowInvalid as exc:
        raise InputFileError(
            f"{path}: an epoch timestamp is out of range ({exc}); check the timestamp column"
        ) from None


def _parse_numbers(values: pa.ChunkedArray, path: Path, column: str) -> pa.Array:
    text = _blank_to_null(values)
    row = _first_failure(text, pa.float64())
    if row is not None:
        raise InputFileError(
            f"{path}, line {row + 2}: column {column!r} has {text[row].as_py()!r}, which is not a number; "
            "fix or remove that line"
        )
    return text.cast(pa.float64())


def _parse_timestamps(values: pa.ChunkedArray, unit: str | None, path: Path, column: str) -> pa.Array:
    """ISO-8601 strings with an offset, or epoch numbers (see `import_mapped_csv`), to timestamp[ms, UTC]."""
    text = pc.utf8_trim_whitespace(_blank_to_null(values))
    numeric = pc.fill_null(pc.match_substring_regex(text, _NUMBER.pattern), False).to_numpy(zero_copy_only=False)
    out = np.zeros(len(text), dtype=np.int64)
    if numeric.any():
        number = text.filter(pa.array(numeric)).cast(pa.float64()).to_numpy()
        if unit is not None:
            scale = np.full(len(number), TIMESTAMP_UNITS[unit])
        else:
            magnitude = np.abs(number)
            scale = np.select([magnitude < 1e11, magnitude < 1e14, magnitude < 1e17], [1000.0, 1.0, 1e-3], 1e-6)
        out[numeric] = np.round(number * scale).astype(np.int64)
    words = ~numeric & text.is_valid().to_numpy(zero_copy_only=False)
    if words.any():
        iso = text.filter(pa.array(words))
        row = _first_failure(iso, TIMESTAMP_TYPE)
        if row is not None:
            line = int(np.flatnonzero(words)[row]) + 2
            raise InputFileError(
                f"{path}, line {line}: column {column!r} has {iso[row].as_py()!r}, which is not an ISO-8601 "
                "timestamp with an offset (e.g. 2024-01-01T10:00:00Z or +01:00) nor an epoch number; naive local "
                "times are ambiguous: add the offset"
            )
        out[words] = iso.cast(TIMESTAMP_TYPE).cast(pa.int64()).to_numpy()
    return pa.array(out, mask=~(numeric | words)).cast(TIMESTAMP_TYPE)


def _blank_to_null(values: pa.ChunkedArray) -> pa.Array:
    array = values.combine_chunks()
    return pc.if_else(pc.equal(pc.utf8_trim_whitespace(array), ""), pa.scalar(None, pa.string()), array)


def _events(
    user: pa.ChunkedArray | pa.Array,
    item: pa.ChunkedArray | pa.Array,
    action: pa.ChunkedArray | pa.Array,
    timestamp: pa.ChunkedArray | pa.Array,
    value: pa.ChunkedArray | pa.Array | None,
) -> pa.Table:
    if value is None:
        value = pa.nulls(len(user), pa.float64())
    columns = [user, item, action, timestamp, value]
    return pa.Table.from_arrays(
        [c.cast(f.type) for c, f in zip(columns, EVENT_SCHEMA, strict=True)], schema=EVENT_SCHEMA
    )
