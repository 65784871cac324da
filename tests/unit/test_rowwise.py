"""One rule set, two executions: the row-wise validator (a request's few events) answers exactly what the batch
validator (files of millions of rows) answers, on a corpus that breaks every rule of the event contract and on random
records; and the one-string readers of timestamps and values read what the column readers read."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recflow.config import EventSettings
from recflow.events.contract import ValidatedBatch, validate_records
from recflow.events.parse import parse_timestamps, parse_values, timestamp_of_text, value_of_text
from recflow.events.rowwise import ROWS_AT_MOST, validate_request, validate_rows
from recflow.events.rules import FILE_ONLY_CODES, REJECTION_CODES, oversized_ids

from ..factories import event

SETTINGS = EventSettings()
NOW = datetime(2024, 6, 1, tzinfo=UTC)

# Each entry breaks one rule (its code), or none (None). Accepted entries vary what the accepted row carries: derived
# and given event ids, ids as integers and beyond ASCII, every timestamp form, values of every kind.
CORPUS: list[tuple[str | None, Any]] = [
    (None, event()),
    (None, event()),  # the same event again: both keep it, with the same derived id (the store dedups)
    (None, event(user_id="ü\u2013用户", item_id="项目\u00a0x", value=2.5)),  # byte lengths differ from character counts
    (None, event(user_id=42, item_id=-7, value=3)),
    (None, event(value=-0.0)),
    (None, event(value=1e-300)),
    (None, event(value="4.5")),
    (None, event(value="+.5e-3")),
    (None, event(value="")),
    (None, event(event_id="given-id")),
    (None, event(event_id=12345)),
    (None, event(event_id="")),  # empty: derived
    (None, event(event_id="e" * 256)),
    (None, event(user_id="u" * 256, item_id="i" * 256)),
    (None, event(timestamp="2024-05-01T14:00:00+02:00")),
    (None, event(timestamp="2024-05-01T17:30:00+0530")),
    (None, event(timestamp="2024-05-01T07:00:00-05")),
    (None, event(timestamp="2024-05-01 12:00:00.5Z")),
    (None, event(timestamp="2024-05-01T12Z")),
    (None, event(timestamp="2024-05-01T12:00:00.123456789Z")),  # beyond ms: floored
    (None, event(timestamp="1969-12-31T23:59:59.999Z")),
    (None, event(timestamp="0001-01-02T00:00:00Z")),
    (None, event(timestamp=1714564800)),
    (None, event(timestamp=1714564800.4996)),
    (None, event(timestamp=1714564800123)),
    (None, event(timestamp=100_000_000_001)),  # above 1e11: milliseconds
    (None, event(timestamp="1714564800")),
    (None, event(timestamp="0000001714564800000")),  # more than 15 digits
    (None, event(timestamp="1.7145648e9")),
    (None, event(timestamp=-1.5)),
    (None, event(action="purchase", extra_field="ignored")),
    ("not_an_object", None),
    ("not_an_object", ["u1", "i1"]),
    ("not_an_object", "u1,i1,view"),
    ("not_an_object", 7),
    ("missing_field", event(user_id=...)),
    ("missing_field", event(item_id=None)),
    ("missing_field", event(action="")),
    ("missing_field", event(timestamp="")),
    ("missing_field", event(timestamp=...)),
    ("wrong_type", event(user_id=["u1"])),
    ("wrong_type", event(item_id=1.5)),
    ("wrong_type", event(action=3)),
    ("wrong_type", event(timestamp=True)),
    ("wrong_type", event(value={"stars": 5})),
    ("wrong_type", event(value=False)),
    ("wrong_type", event(event_id=1.0)),
    ("empty_id", event(user_id="")),
    ("empty_id", event(item_id=" \t\u3000")),
    ("id_too_long", event(user_id="u" * 257)),
    ("id_too_long", event(item_id="i" * 10_000)),
    ("id_too_long", event(event_id="e" * 300)),
    ("unknown_action", event(action="clik")),
    ("unknown_action", event(action="View")),
    ("bad_timestamp", event(timestamp="yesterday")),
    ("bad_timestamp", event(timestamp="2024-02-30T12:00:00Z")),
    ("bad_timestamp", event(timestamp="2024-05-01T24:00:00Z")),
    ("bad_timestamp", event(timestamp="2024-05-01T12:00:00+24:00")),
    ("bad_timestamp", event(timestamp="0001-01-01T00:00:00+02:01")),
    ("bad_timestamp", event(timestamp="2024-05-01T12:00:00Z\n")),
    ("bad_timestamp", event(timestamp="٢٠٢٤-05-01T12:00:00Z")),  # digits beyond ASCII
    ("bad_timestamp", event(timestamp=1e300)),
    ("bad_timestamp", event(timestamp=float("nan"))),
    ("bad_timestamp", event(timestamp=-1e14)),
    ("naive_timestamp", event(timestamp="2024-05-01T12:00:00")),
    ("naive_timestamp", event(timestamp="2024-05-01")),
    ("future_timestamp", event(timestamp="2024-06-01T01:00:00Z")),
    ("future_timestamp", event(timestamp=1717200301)),
    ("bad_value", event(value="abc")),
    ("bad_value", event(value=float("nan"))),
    ("bad_value", event(value=float("inf"))),
    ("bad_value", event(value="inf")),
    ("bad_value", event(value="1e400")),
    ("bad_value", event(value="1_000")),
    # the first failing rule wins, in the contract's order
    ("missing_field", event(user_id=..., action="clik")),
    ("empty_id", event(user_id="", action="clik")),
    ("unknown_action", event(action="clik", timestamp="yesterday")),
    ("naive_timestamp", event(timestamp="2024-05-01T12:00:00", value="x")),
    ("bad_value", event(value="x", event_id="e" * 300)),
]


def as_rows(batch: ValidatedBatch) -> tuple[list[dict[str, Any]], list[Any]]:
    return batch.accepted.to_pylist(), batch.rejected


def test_the_corpus_breaks_every_rule_a_record_can_break() -> None:
    """A new rejection code fails here until the corpus has a record that breaks it (or it is a file-only code)."""
    found = {code for code, _ in CORPUS if code is not None}
    assert found == set(REJECTION_CODES) - set(FILE_ONLY_CODES)
    assert set(FILE_ONLY_CODES) <= set(REJECTION_CODES)


@pytest.mark.parametrize(("code", "record"), CORPUS, ids=[f"{i}-{code}" for i, (code, _) in enumerate(CORPUS)])
def test_both_executions_answer_the_same_for_each_record(code: str | None, record: Any) -> None:
    batch = validate_records([record], settings=SETTINGS, now=NOW)
    rows = validate_rows([record], settings=SETTINGS, now=NOW)
    assert [r.code for r in batch.rejected] == ([] if code is None else [code])  # the corpus says what it breaks
    assert as_rows(rows) == as_rows(batch)
    assert rows.accepted.equals(batch.accepted) and rows.accepted.schema == batch.accepted.schema


def test_both_executions_answer_the_same_for_the_corpus_as_one_batch() -> None:
    """In one batch the column reader takes other paths (a column pyarrow cannot cast whole): still the same."""
    records = [record for _, record in CORPUS]
    batch = validate_records(records, settings=SETTINGS, now=NOW)
    rows = validate_rows(records, settings=SETTINGS, now=NOW, source="request")
    assert as_rows(rows) == as_rows(batch)
    assert rows.accepted.equals(batch.accepted)
    assert [r.record for r in rows.rejected] == [i + 1 for i, (code, _) in enumerate(CORPUS) if code is not None]
    first, repeated = rows.accepted["event_id"].to_pylist()[:2]
    assert first == repeated  # kept twice, under one id


def test_a_request_takes_whichever_execution_is_faster_for_its_size() -> None:
    records = [event(user_id=f"u{i}", action=["view", "clik"][i % 3 == 0]) for i in range(ROWS_AT_MOST + 5)]
    for some in (records[:3], records[:ROWS_AT_MOST], records):
        assert as_rows(validate_request(some, settings=SETTINGS, now=NOW)) == as_rows(
            validate_records(some, settings=SETTINGS, now=NOW)
        )


def test_an_oversized_id_of_a_request_is_named_with_the_contract_s_reason() -> None:
    """The service refuses such a request whole (422) with the reason both validators give the event."""
    record = event(user_id="u" * 257, item_id=10**300, event_id="fine")
    named = oversized_ids(record, SETTINGS)
    assert [name for name, _ in named] == ["user_id", "item_id"]
    assert named[0][1] == validate_rows([record], settings=SETTINGS, now=NOW).rejected[0].reason
    assert oversized_ids(event(user_id="u" * 256), SETTINGS) == []


def test_the_row_wise_validator_needs_an_aware_now() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        validate_rows([event()], settings=SETTINGS, now=datetime(2024, 6, 1))


# -- random records ------------------------------------------------------------------------------------------------

DIGITS = st.text("0123456789", min_size=1, max_size=4)
ISO_LIKE = st.builds(
    lambda y, mo, d, sep, h, rest, zone: f"{y}-{mo}-{d}{sep}{h}{rest}{zone}",
    st.sampled_from(["2024", "0001", "0000", "9999", "1969", "2023"]),
    st.sampled_from(["01", "02", "12", "13", "00"]),
    st.sampled_from(["01", "28", "29", "30", "31", "00"]),
    st.sampled_from(["T", " ", "t", "X"]),
    st.sampled_from(["00", "12", "23", "24", "7"]),
    st.sampled_from(["", ":00", ":59:59", ":00:60", ":00:00.5", ":00:00.123", ":00:00.1234", ":00:00.", ":61"]),
    st.sampled_from(["", "Z", "z", "+02:00", "-0530", "+05", "+24:00", "+23:59", "+0", " Z", "Z\n"]),
)
TIMESTAMP_TEXT = st.one_of(
    ISO_LIKE,
    st.builds(str, st.integers(-(10**16), 10**16)),
    st.builds(repr, st.floats(allow_nan=True, allow_infinity=True)),
    st.text(st.sampled_from("0123456789+-.eE:TZ "), min_size=1, max_size=12),
    st.text(min_size=1, max_size=8),
)
VALUE_TEXT = st.one_of(
    st.builds(repr, st.floats()),
    st.builds(str, st.integers(-(10**30), 10**30)),
    st.text(st.sampled_from("0123456789+-.eE_ xinfa"), max_size=8),
    st.sampled_from(["inf", "-Infinity", "nan", "NaN", "1e400", "-0", "00012", "1.", ".5", "0x10"]),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(TIMESTAMP_TEXT, min_size=1, max_size=6))
def test_one_string_reads_as_its_column_reads_it(texts: list[str]) -> None:
    ms, status = parse_timestamps(pa.array(texts, pa.string()))
    read = [timestamp_of_text(text) for text in texts]
    assert [s for _, s in read] == status.tolist()
    assert [m for m, s in read if s == 0] == ms[status == 0].tolist()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(VALUE_TEXT, min_size=1, max_size=6))
def test_one_value_reads_as_its_column_reads_it(texts: list[str]) -> None:
    values, absent = parse_values(pa.array(texts, pa.string()))
    column = [
        None if a else (v if math.isfinite(v) else "not finite") for v, a in zip(values.tolist(), absent, strict=True)
    ]
    one = [v if v is None or math.isfinite(v) else "not finite" for v in map(value_of_text, texts)]
    assert one == column


ID = st.one_of(st.text(max_size=5), st.integers(-(10**20), 10**20), st.just("x" * 257), st.none())
RECORD = st.fixed_dictionaries(
    {},
    optional={
        "user_id": ID,
        "item_id": ID,
        "action": st.sampled_from(["view", "purchase", "clik", "", 1]),
        "timestamp": st.one_of(TIMESTAMP_TEXT, st.integers(-(10**15), 10**15), st.floats(), st.booleans()),
        "value": st.one_of(VALUE_TEXT, st.floats(), st.integers(-(10**20), 10**20), st.none()),
        "event_id": ID,
    },
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.one_of(RECORD, st.just(event())), min_size=1, max_size=8))
def test_both_executions_answer_the_same_for_random_records(records: list[Any]) -> None:
    batch = validate_records(records, settings=SETTINGS, now=NOW)
    rows = validate_rows(records, settings=SETTINGS, now=NOW)
    assert as_rows(rows) == as_rows(batch)
