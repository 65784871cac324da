"""The event contract applied one record at a time, for a request's few events (the HTTP service's POST /events and
the `recent_events` of POST /recommend).

`validate_rows` answers what `contract.validate_records` answers for the same records (the same accepted rows with
the same derived event ids, timestamps and values; the same rejections with the same record numbers, codes, reasons
and raw text), from the one rule set in `recflow.events.rules`, with plain Python per record: no Arrow compute and no
duckdb query per call. The batch validator pays 4-7 ms per call whatever its size (a duckdb query for the event ids,
some 40 Arrow calls), this one ~10 us per record (benchmarks/bench_validation.py), so `validate_request` takes it for
up to ROWS_AT_MOST records. Like the batch validator it keeps every accepted record, a repeated event included:
duplicates are found by event id where events are stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from recflow.config import EventSettings
from recflow.constants import ACTION, EVENT_ID, ITEM_ID, TIMESTAMP, USER_ID, VALUE
from recflow.events.contract import STORE_SCHEMA, Rejection, ValidatedBatch, validate_records
from recflow.events.parse import BAD, NAIVE, timestamp_of_text, value_of_text
from recflow.events.rules import (
    CONTENT_RULES,
    FIELD_ORDER,
    as_text,
    derived_event_id,
    dumps,
    future_limit_ms,
    is_blank,
    reason,
    shape_problem,
    too_long,
)

# Up to this many records a request is checked row-wise: ~10 us a record against the batch validator's ~4 ms fixed
# cost and ~2 us a record, the two meet near 500 records (benchmarks/bench_validation.py).
ROWS_AT_MOST = 250


def validate_request(
    records: Sequence[Any],
    *,
    settings: EventSettings,
    source: str = "request",
    now: datetime | None = None,
) -> ValidatedBatch:
    """A request's records validated by whichever execution is faster for their number; the answer is the same."""
    validate = validate_rows if len(records) <= ROWS_AT_MOST else validate_records
    return validate(records, settings=settings, source=source, now=now)


def validate_rows(
    records: Sequence[Any],
    *,
    settings: EventSettings,
    source: str = "request",
    now: datetime | None = None,
) -> ValidatedBatch:
    """Validate JSON-decoded records as `contract.validate_records` does (see the module docstring). Never raises
    for bad input: a record of the wrong shape or type is a Rejection numbered by its 1-based position."""
    now = datetime.now(UTC) if now is None else now
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware, e.g. datetime.now(UTC)")
    limit_ms = future_limit_ms(now, settings)
    accepted: dict[str, list[Any]] = {name: [] for name in STORE_SCHEMA.names}
    rejected: list[Rejection] = []
    for number, record in enumerate(records, 1):
        problem = shape_problem(record)
        if problem is None:
            row = _Row.of(record, settings, limit_ms)
            problem = row.problem(now)
            if problem is None:
                row.accept(accepted)
        if problem is not None:
            rejected.append(Rejection(source, number, problem[0], problem[1], dumps(record)))
    return ValidatedBatch(accepted=pa.Table.from_pydict(accepted, schema=STORE_SCHEMA), rejected=rejected)


@dataclass(slots=True)  # not frozen: a frozen dataclass costs a third more to build, once per record
class _Row:
    """One well-shaped record: its fields as text, its timestamp read (epoch ms and status) and its value."""

    text: dict[str, str | None]
    ms: int
    status: int
    value: float | None
    settings: EventSettings
    limit_ms: int

    @classmethod
    def of(cls, record: Mapping[str, Any], settings: EventSettings, limit_ms: int) -> _Row:
        text = {name: as_text(record.get(name)) for name in FIELD_ORDER}
        ms, status = timestamp_of_text(text[TIMESTAMP] or "")
        value = text[VALUE]
        return cls(text, ms, status, None if value is None else value_of_text(value), settings, limit_ms)

    def problem(self, now: datetime) -> tuple[str, str] | None:
        """The first content rule this record breaks (code, reason), in the order of CONTENT_RULES."""
        for name, code in CONTENT_RULES:
            if _BROKEN[code](self, name):
                return code, reason(code, name, self.text[name], self.settings, ms=self.ms, now=now)
        return None

    def accept(self, columns: dict[str, list[Any]]) -> None:
        """Append this record to the accepted columns (STORE_SCHEMA), its event id derived when none was given."""
        user, item, action = (str(self.text[name]) for name in (USER_ID, ITEM_ID, ACTION))
        given = self.text[EVENT_ID]
        columns[EVENT_ID].append(given or derived_event_id(user, item, action, self.ms, self.value))
        columns[USER_ID].append(user)
        columns[ITEM_ID].append(item)
        columns[ACTION].append(action)
        columns[TIMESTAMP].append(self.ms)
        columns[VALUE].append(self.value)


# how a record breaks each rule of CONTENT_RULES (`contract._check_rows` has the same over whole columns)
_BROKEN: dict[str, Callable[[_Row, str], bool]] = {
    "empty_id": lambda row, name: is_blank(row.text[name] or ""),
    "id_too_long": lambda row, name: too_long(row.text[name] or "", row.settings),
    "unknown_action": lambda row, name: row.text[name] not in row.settings.actions,
    "bad_timestamp": lambda row, name: row.status == BAD,
    "naive_timestamp": lambda row, name: row.status == NAIVE,
    "future_timestamp": lambda row, name: row.ms > row.limit_ms,
    "bad_value": lambda row, name: row.value is not None and not math.isfinite(row.value),
}
