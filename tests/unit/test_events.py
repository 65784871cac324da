"""The event contract: every record is accepted or rejected with a reason, timestamps are normalised to
UTC, and derived event ids are deterministic."""

from __future__ import annotations

import hashlib
import json
import struct
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest

import recflow.events.contract as events_module
from recflow.config import EventSettings
from recflow.events.contract import STORE_SCHEMA, derive_event_ids, validate_records, validate_table
from recflow.events.rules import REJECTION_CODES

from ..factories import event

SETTINGS = EventSettings()
NOW = datetime(2024, 6, 1, tzinfo=UTC)
NOON = datetime(2024, 5, 1, 12, tzinfo=UTC)  # 2024-05-01T12:00:00Z = 1714564800 s


def reference_id(user: str, item: str, action: str, ms: int, value: float | None) -> str:
    """The derived event id as the events module documents it, computed with hashlib."""
    bits = "" if value is None else str(struct.unpack("<q", struct.pack("<d", value))[0])
    key = f"{len(user.encode())}:{user}\x1f{len(item.encode())}:{item}\x1f{action}\x1f{ms}\x1f{bits}"
    return "h" + hashlib.md5(key.encode()).hexdigest()[:24]


def only_rejection(record: dict[str, Any]):
    batch = validate_records([record], settings=SETTINGS, now=NOW)
    assert batch.accepted.num_rows == 0
    assert len(batch.rejected) == 1
    return batch.rejected[0]


@pytest.mark.parametrize(
    ("record", "code", "words"),
    [
        (event(user_id=...), "missing_field", ["user_id is missing"]),
        (event(timestamp=None), "missing_field", ["timestamp is missing"]),
        (event(action=""), "missing_field", ["action is missing"]),
        (event(item_id=""), "empty_id", ["item_id", "empty"]),
        (event(user_id="   "), "empty_id", ["user_id", "empty"]),
        (event(user_id="u" * 257), "id_too_long", ["user_id has 257 characters", "256", "events.max_id_length"]),
        (event(event_id="e" * 300), "id_too_long", ["event_id has 300 characters"]),
        (event(timestamp="yesterday"), "bad_timestamp", ["timestamp 'yesterday'", "ISO-8601", "epoch"]),
        (event(timestamp="2024-02-30T12:00:00Z"), "bad_timestamp", ["timestamp '2024-02-30T12:00:00Z'"]),
        # regression: before 0001-01-02 (the numbers' bound too) it was accepted, and no datetime could hold it
        (event(timestamp="0001-01-01T00:00:00+02:01"), "bad_timestamp", ["timestamp '0001-01-01T00:00:00+02:01'"]),
        (event(timestamp="2024-05-01T12:00:00"), "naive_timestamp", ["timestamp '2024-05-01T12:00:00'", "Z or +HH:MM"]),
        (event(timestamp="2024-05-01"), "naive_timestamp", ["Z or +HH:MM"]),
        (event(timestamp="2024-06-01T01:00:00Z"), "future_timestamp", ["timestamp", "3600 s after now", "skew"]),
        (event(value="abc"), "bad_value", ["value 'abc' is not a finite number"]),
        (event(value=float("nan")), "bad_value", ["value"]),
        (event(user_id=["u1"]), "wrong_type", ["user_id must be a string", "list"]),
        (event(item_id=1.5), "wrong_type", ["item_id must be a string", "float"]),
        (event(action=3), "wrong_type", ["action must be a string", "int"]),
        (event(timestamp=True), "wrong_type", ["timestamp must be", "bool"]),
        (event(value={"stars": 5}), "wrong_type", ["value must be a number", "dict"]),
        (event(value=False), "wrong_type", ["value must be a number", "bool"]),
    ],
)
def test_each_rejection_names_the_field_and_the_fix(record: dict[str, Any], code: str, words: list[str]) -> None:
    rejection = only_rejection(record)
    assert rejection.code == code
    for word in words:
        assert word in rejection.reason
    assert rejection.source == "request"
    assert rejection.record == 1
    assert json.loads(rejection.raw) == json.loads(json.dumps(record))


def test_unknown_action_reason_lists_the_configured_actions() -> None:
    rejection = only_rejection(event(action="clik"))
    assert rejection.code == "unknown_action"
    assert rejection.reason == (
        "action 'clik' is not one of view, click, add_to_cart, purchase (params.yaml: events.actions)"
    )


def test_future_skew_is_configurable() -> None:
    record = event(timestamp="2024-06-01T00:04:00Z")  # 240 s after NOW
    assert validate_records([record], settings=SETTINGS, now=NOW).accepted.num_rows == 1
    strict = EventSettings(max_future_skew_seconds=60)
    assert only_rejection_with(strict, record).code == "future_timestamp"


def only_rejection_with(settings: EventSettings, record: dict[str, Any]):
    batch = validate_records([record], settings=settings, now=NOW)
    assert len(batch.rejected) == 1
    return batch.rejected[0]


def test_first_failing_rule_wins_in_documented_order() -> None:
    records = [
        event(user_id=..., action="clik"),  # shape before content
        event(user_id="", action="clik"),  # user_id before action
        event(value=[1], timestamp=...),  # missing timestamp before a wrongly typed value
        event(action="clik", timestamp="yesterday"),  # action before timestamp
        event(timestamp="2024-05-01T12:00:00", value="x"),  # timestamp before value
    ]
    batch = validate_records(records, settings=SETTINGS, now=NOW)
    assert [r.code for r in batch.rejected] == [
        "missing_field",
        "empty_id",
        "missing_field",
        "unknown_action",
        "naive_timestamp",
    ]
    assert "timestamp" in batch.rejected[2].reason


def test_validate_records_never_raises_on_garbage() -> None:
    records: list[Any] = [None, 5, "x", [event()], {"user_id": {"a": 1}}, event()]
    batch = validate_records(records, settings=SETTINGS, now=NOW)
    assert [r.code for r in batch.rejected] == ["not_an_object"] * 4 + ["wrong_type"]
    assert [r.record for r in batch.rejected] == [1, 2, 3, 4, 5]
    assert batch.accepted.num_rows == 1


def test_every_record_is_accepted_or_rejected_exactly_once() -> None:
    records = [event(user_id=f"u{i}", action=["view", "clik"][i % 2], value=i) for i in range(50)]
    batch = validate_records(records, settings=SETTINGS, now=NOW)
    assert batch.accepted.num_rows == 25
    assert sorted(r.record for r in batch.rejected) == list(range(2, 51, 2))
    assert sorted(batch.accepted["user_id"].to_pylist()) == sorted(f"u{i}" for i in range(0, 50, 2))


def test_a_batch_checked_in_slices_equals_the_batch_checked_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are checked in slices on all cores; slicing must not change what is accepted, in which order, with
    which id, nor which record a rejection names."""
    table = pa.table(
        {
            "user_id": [f"u{i}" if i % 5 else "" for i in range(40)],
            "item_id": ["i1"] * 40,
            "action": ["view" if i % 7 else "clik" for i in range(40)],
            "timestamp": ["2024-05-01T12:00:00Z" if i % 3 else str(1714564800 + i) for i in range(40)],
            "event_id": [f"e{i}" if i % 4 == 0 else None for i in range(40)],
        }
    )
    whole = validate_table(table, settings=SETTINGS, source="t", now=NOW)
    monkeypatch.setattr(events_module, "_SLICE", 2)  # rows 14-15 and 20-21 form slices rejected whole
    monkeypatch.setattr(events_module, "_INLINE_ROWS", 0)  # on a thread pool, as big batches are
    sliced = validate_table(table, settings=SETTINGS, source="t", now=NOW)
    assert sliced.accepted.equals(whole.accepted)
    assert sliced.rejected == whole.rejected
    assert [r.record for r in whole.rejected] == [i + 1 for i in range(40) if i % 5 == 0 or i % 7 == 0]


def test_a_table_without_a_required_column_rejects_every_row() -> None:
    """The absent column is checked as a column of nulls (a plain array, not chunked): explaining its rejections
    must not assume chunks."""
    table = pa.table({"user_id": ["u1", "u2"], "item_id": ["i1", "i1"], "action": ["view", "click"]})
    batch = validate_table(table, settings=SETTINGS, source="t", now=NOW)
    assert batch.accepted.num_rows == 0
    assert [(r.record, r.code) for r in batch.rejected] == [(1, "missing_field"), (2, "missing_field")]
    assert batch.rejected[0].reason.startswith("timestamp is missing")
    assert json.loads(batch.rejected[1].raw) == {"user_id": "u2", "item_id": "i1", "action": "click"}


SAME_INSTANT = [
    "2024-05-01T12:00:00Z",
    "2024-05-01T14:00:00+02:00",
    "2024-05-01T07:00:00-05:00",
    "2024-05-01T17:30:00+0530",
    "2024-05-01 12:00:00.000Z",
    "2024-05-01T12:00:00.000000+00:00",
    "2024-05-01T12:00:00.000000000Z",  # nanoseconds: parsed by the per-string fallback
    1714564800,
    1714564800.0,
    1714564800000,
    "1714564800",
    "1714564800000",
]


@pytest.mark.parametrize("timestamp", SAME_INSTANT)
def test_timestamp_forms_are_normalised_to_the_same_utc_instant(timestamp: Any) -> None:
    batch = validate_records([event(timestamp=timestamp)], settings=SETTINGS, now=NOW)
    assert batch.rejected == []
    assert batch.accepted["timestamp"].to_pylist() == [NOON]


def test_mixed_timestamp_forms_in_one_text_column() -> None:
    texts = [str(t) for t in SAME_INSTANT] + ["2024-05-01T12:00:00.5Z", "bad", "2024-05-01T12:00:00"]
    n = len(texts)
    table = pa.table({"user_id": ["u"] * n, "item_id": ["i"] * n, "action": ["view"] * n, "timestamp": texts})
    batch = validate_table(table, settings=SETTINGS, source="t", now=NOW)
    assert batch.accepted["timestamp"].to_pylist() == [NOON] * len(SAME_INSTANT) + [NOON + timedelta(seconds=0.5)]
    assert [(r.record, r.code) for r in batch.rejected] == [(n - 1, "bad_timestamp"), (n, "naive_timestamp")]


def test_epoch_numbers_above_1e11_are_milliseconds() -> None:
    records = [event(timestamp=99_999_999_999), event(timestamp=100_000_000_001)]
    batch = validate_records(records, settings=SETTINGS, now=datetime(6000, 1, 1, tzinfo=UTC))
    first, second = batch.accepted["timestamp"].to_pylist()
    assert first == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=99_999_999_999)
    assert second == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=100_000_000_001)


def test_typed_columns_from_parquet_or_pandas() -> None:
    moment = pa.array([NOON, NOON, NOON], pa.timestamp("us", tz="Europe/Berlin"))
    table = pa.table(
        {
            "user_id": pa.array([7, 8, 9]),
            "item_id": pa.array(["a", "b", "c"]).dictionary_encode(),
            "action": ["view", "click", "purchase"],
            "timestamp": moment,
            "value": pa.array([1, None, 3], pa.int32()),
        }
    )
    batch = validate_table(table, settings=SETTINGS, source="t", now=NOW)
    assert batch.rejected == []
    assert batch.accepted.schema == STORE_SCHEMA
    assert batch.accepted["user_id"].to_pylist() == ["7", "8", "9"]
    assert batch.accepted["timestamp"].to_pylist() == [NOON] * 3
    assert batch.accepted["value"].to_pylist() == [1.0, None, 3.0]


def test_typed_columns_of_the_wrong_kind_are_rejected() -> None:
    table = pa.table(
        {
            "user_id": pa.array([1.0, None]),
            "item_id": ["a", "b"],
            "action": ["view", "view"],
            "timestamp": pa.array([datetime(2024, 5, 1, 12)] * 2, pa.timestamp("ms")),
        }
    )
    batch = validate_table(table, settings=SETTINGS, source="t.parquet", now=NOW, record_offset=10)
    assert [(r.record, r.code) for r in batch.rejected] == [(11, "wrong_type"), (12, "missing_field")]
    naive = validate_table(table.set_column(0, "user_id", pa.array(["u", "v"])), settings=SETTINGS, source="t")
    assert {r.code for r in naive.rejected} == {"naive_timestamp"}


def test_derived_event_id_matches_the_documented_formula() -> None:
    batch = validate_records([event(value=4.5), event(user_id="é✓", value=-0.0)], settings=SETTINGS, now=NOW)
    ms = 1_714_564_800_000
    assert batch.accepted["event_id"].to_pylist() == [
        reference_id("u1", "i1", "view", ms, 4.5),
        reference_id("é✓", "i1", "view", ms, -0.0),
    ]
    # pinned, so that a change of formula (which would re-store replayed events) cannot go unnoticed
    assert batch.accepted["event_id"][0].as_py() == "hf025706c319942cc9f4ca2fb"


def test_derived_event_id_is_deterministic_and_depends_on_every_field() -> None:
    variants = [
        event(),
        event(user_id="u2"),
        event(item_id="i2"),
        event(action="click"),
        event(timestamp="2024-05-01T12:00:00.001Z"),
        event(value=1),
        event(value=0),
        event(user_id="u1\x1f2:i1", item_id="x"),  # separators inside ids cannot make two keys equal
        event(user_id="u1", item_id="\x1f2:i1x"),
    ]
    first = validate_records(variants, settings=SETTINGS, now=NOW).accepted["event_id"].to_pylist()
    again = validate_records(variants, settings=SETTINGS, now=NOW).accepted["event_id"].to_pylist()
    assert first == again
    assert len(set(first)) == len(variants)
    replayed = validate_records([event(timestamp=1714564800000, value=None)], settings=SETTINGS, now=NOW)
    assert replayed.accepted["event_id"].to_pylist() == [first[0]]


def test_given_event_id_is_kept_and_empty_one_is_derived() -> None:
    batch = validate_records(
        [event(event_id="abc"), event(event_id=""), event(event_id=42)], settings=SETTINGS, now=NOW
    )
    ids = batch.accepted["event_id"].to_pylist()
    assert ids[0] == "abc"
    assert ids[1] == reference_id("u1", "i1", "view", 1_714_564_800_000, None)
    assert ids[2] == "42"


def test_derive_event_ids_keeps_row_order_on_large_tables() -> None:
    n = 300_000
    table = pa.table(
        {
            "user_id": pa.array([f"u{i}" for i in range(n)]),
            "item_id": pa.array(["i"] * n),
            "action": pa.array(["view"] * n),
            "timestamp": pa.array(range(n), pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
            "value": pa.nulls(n, pa.float64()),
        }
    )
    ids = derive_event_ids(table).to_pylist()
    for i in (0, 1, n // 2, n - 1):
        assert ids[i] == reference_id(f"u{i}", "i", "view", i, None)


def test_now_must_be_timezone_aware() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        validate_records([event()], settings=SETTINGS, now=datetime(2024, 6, 1))


def test_rejection_codes_are_the_documented_set() -> None:
    assert set(REJECTION_CODES) == {
        "bad_json", "not_an_object", "bad_row", "missing_field", "wrong_type", "empty_id", "id_too_long",
        "unknown_action", "bad_timestamp", "naive_timestamp", "future_timestamp", "bad_value",
    }  # fmt: skip
