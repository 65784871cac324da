"""The event contract's rules, stated once: which checks run in which order, what each rejection is called, the
reason it gives, and the derived event id. Two executions read them and are tested to agree on every code
(tests/unit/test_rowwise.py): `recflow.events.contract` checks whole Arrow columns (files of millions of rows),
`recflow.events.rowwise` checks one record at a time (a request's few events, no Arrow compute, no SQL).

Every record is accepted or rejected once, by the first failing check:

1. shape, field by field in FIELD_ORDER (`shape_problem`): `missing_field` (absent, null, or an empty
   action/timestamp), `wrong_type` (a list, object or bool where text or a number belongs);
2. content, in the order of CONTENT_RULES: `empty_id` / `id_too_long` (user_id, item_id), `unknown_action`,
   `bad_timestamp` / `naive_timestamp` / `future_timestamp`, `bad_value`, `id_too_long` (event_id).

Reading a file (`fileio.read_event_file`) can also reject a record as `bad_json`, `not_an_object` (JSON lines) or
`bad_row` (a CSV row with the wrong number of fields); records already decoded (a request's) can only be
`not_an_object` of those (FILE_ONLY_CODES are the other two). Unknown extra fields are ignored.

Derived event ids. An event without `event_id` gets `"h" + md5(key).hexdigest()[:24]` (96 bits) with the UTF-8 key
`f"{len(user_id.encode())}:{user_id}\\x1f{len(item_id.encode())}:{item_id}\\x1f{action}\\x1f{ms}\\x1f{bits}"`, where
`ms` is the UTC timestamp in epoch milliseconds and `bits` is the value's IEEE-754 float64 bit pattern as a signed
64-bit decimal (`struct.unpack("<q", struct.pack("<d", value))[0]`), empty when value is null (`derived_event_id`).
MD5 is a fixed standard, so the id is stable across recflow, pyarrow and duckdb versions, and any client can compute
it; a replayed event always gets the same id and is stored once.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from recflow.config import EventSettings
from recflow.constants import ACTION, EVENT_ID, ITEM_ID, REQUIRED_COLUMNS, TIMESTAMP, USER_ID, VALUE
from recflow.events.parse import EPOCH, ID_FIELDS

FIELD_ORDER = (USER_ID, ITEM_ID, ACTION, TIMESTAMP, VALUE, EVENT_ID)
MAX_RAW_CHARS = 2000  # a rejection keeps at most this much of the record's text

REJECTION_CODES = (
    "bad_json", "not_an_object", "bad_row", "missing_field", "wrong_type", "empty_id", "id_too_long",
    "unknown_action", "bad_timestamp", "naive_timestamp", "future_timestamp", "bad_value",
)  # fmt: skip
FILE_ONLY_CODES = ("bad_json", "bad_row")  # found while reading a file: decoded records cannot have them
# the content checks, first failing one wins; (field, code)
CONTENT_RULES = (
    (USER_ID, "empty_id"),
    (USER_ID, "id_too_long"),
    (ITEM_ID, "empty_id"),
    (ITEM_ID, "id_too_long"),
    (ACTION, "unknown_action"),
    (TIMESTAMP, "bad_timestamp"),
    (TIMESTAMP, "naive_timestamp"),
    (TIMESTAMP, "future_timestamp"),
    (VALUE, "bad_value"),
    (EVENT_ID, "id_too_long"),
)
_EXPECTED = {
    USER_ID: "a string (or an integer)",
    ITEM_ID: "a string (or an integer)",
    EVENT_ID: "a string (or an integer)",
    ACTION: "a string",
    TIMESTAMP: "an ISO-8601 string with offset or a number of epoch seconds/milliseconds",
    VALUE: "a number or null",
}


def shape_problem(record: Any) -> tuple[str, str] | None:
    """The shape rejection (code, reason) of a JSON-decoded record, or None when its shape is right."""
    if not isinstance(record, Mapping):
        kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(record), "number")
        return "not_an_object", f"record is a JSON {kind}, not an object; send one object per event"
    for name in FIELD_ORDER:
        value = record.get(name)
        if value is None or (value == "" and name in (ACTION, TIMESTAMP)):
            if name in REQUIRED_COLUMNS:
                return "missing_field", missing_reason(name)
            continue
        if isinstance(value, str):
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (number and (name in (TIMESTAMP, VALUE) or (name in ID_FIELDS and isinstance(value, int)))):
            return "wrong_type", wrong_type_reason(name, value)
    return None


def as_text(value: Any) -> str | None:
    """A field of a well-shaped record as the text the content checks read (numbers as Python writes them)."""
    if value is None or isinstance(value, str):
        return value
    return repr(float(value)) if isinstance(value, float) else str(value)


def future_limit_ms(now: datetime, settings: EventSettings) -> int:
    """The latest timestamp accepted at `now` (epoch ms): now plus events.max_future_skew_seconds."""
    return (now - EPOCH) // timedelta(milliseconds=1) + int(settings.max_future_skew_seconds * 1000)


def is_blank(text: str) -> bool:
    """`empty_id`: no characters, or only whitespace (Python's and pyarrow's `utf8_is_space` agree on every one)."""
    return not text or text.isspace()


def too_long(text: str, settings: EventSettings) -> bool:
    """`id_too_long`: more characters (code points) than events.max_id_length."""
    return len(text) > settings.max_id_length


def reason(
    code: str, name: str, value: Any, settings: EventSettings, *, ms: int = 0, now: datetime | None = None
) -> str:
    """Why field `name` holding `value` (its text, or a typed column's value) broke the rule `code`; `ms` (the
    record's timestamp in epoch ms) and `now` are read by future_timestamp only."""
    if code == "missing_field":
        return missing_reason(name)
    if code == "wrong_type":
        return wrong_type_reason(name, value)
    if code == "empty_id":
        return f"{name} is empty or blank; give a non-empty id"
    if code == "id_too_long":
        limit = f"more than {settings.max_id_length} (params.yaml: events.max_id_length)"
        return f"{name} has {len(str(value))} characters, {limit}: {show(value)}"
    if code == "unknown_action":
        return f"action {show(value)} is not one of {', '.join(settings.actions)} (params.yaml: events.actions)"
    if code == "naive_timestamp":
        return f"timestamp {show(value)} has no UTC offset; add Z or +HH:MM (recflow never guesses a timezone)"
    if code == "future_timestamp":
        if now is None:
            raise ValueError("the reason of a future_timestamp needs now")
        skew = f"events.max_future_skew_seconds={settings.max_future_skew_seconds:g} (params.yaml)"
        utc_now, moment = now.astimezone(UTC), EPOCH + timedelta(milliseconds=ms)
        ahead = (moment - utc_now).total_seconds()
        return (f"timestamp {show(value)} ({moment.isoformat()}) is {ahead:.0f} s after now ({utc_now.isoformat()}), "
                f"more than {skew}; check the sender's clock")  # fmt: skip
    if code == "bad_value":
        return f"value {show(value)} is not a finite number; give a number (rating, quantity, seconds) or leave it out"
    if code == "bad_timestamp":
        return (f"timestamp {show(value)} is not a date-time; give ISO-8601 with an offset (2024-05-01T12:00:00Z, "
                "2024-05-01T14:00:00+02:00) or epoch seconds or milliseconds")  # fmt: skip
    raise ValueError(f"{code!r} is not a rule of a record's fields (see CONTENT_RULES and shape_problem)")


def oversized_ids(record: Mapping[str, Any], settings: EventSettings) -> list[tuple[str, str]]:
    """(field, reason) of each id of a decoded record (or request) longer than events.max_id_length; the service
    refuses such a request whole (422) before any other check."""
    texts = ((name, as_text(record.get(name))) for name in ID_FIELDS)
    return [
        (name, reason("id_too_long", name, text, settings)) for name, text in texts if text and too_long(text, settings)
    ]


def missing_reason(name: str) -> str:
    return f"{name} is missing; every event needs {', '.join(REQUIRED_COLUMNS)}"


def wrong_type_reason(name: str, value: Any) -> str:
    return f"{name} must be {_EXPECTED[name]}, got {type(value).__name__} {show(value)}"


def show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dumps(record: Any) -> str:
    """A decoded record as the text a rejection keeps."""
    return json.dumps(record, ensure_ascii=False, default=str)[:MAX_RAW_CHARS]


def derived_event_id(user_id: str, item_id: str, action: str, ms: int, value: float | None) -> str:
    """The event id of an event given without one (see the module docstring); `contract.derive_event_ids` computes
    the same for whole tables in duckdb."""
    bits = "" if value is None else str(struct.unpack("<q", struct.pack("<d", value))[0])
    key = f"{len(user_id.encode())}:{user_id}\x1f{len(item_id.encode())}:{item_id}\x1f{action}\x1f{ms}\x1f{bits}"
    return "h" + hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()[:24]
