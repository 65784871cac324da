"""Event files: each format reads into rows with their record numbers (and the records that could not even be
read, with a reason), and written files read back as the same events."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from recflow.config import EventSettings, GenerateSettings
from recflow.constants import EVENT_ID
from recflow.errors import InputFileError
from recflow.events.contract import EVENT_SCHEMA, validate_records, validate_table
from recflow.events.fileio import read_event_file, write_events
from recflow.events.rules import MAX_RAW_CHARS
from recflow.events.synth import generate_events

from ..factories import event

SETTINGS = EventSettings()
NOW = datetime(2024, 6, 1, tzinfo=UTC)


# -- reading -----------------------------------------------------------------------------------------------


def test_jsonl_bad_lines_are_rejected_with_their_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    lines = [json.dumps(event()), "{not json", "[1, 2]", "", json.dumps(event(user_id="u2", extra={"x": 1}))]
    path.write_text("\n".join(lines) + "\n")
    table, rejected = read_event_file(path)
    assert [(r.record, r.code) for r in rejected] == [(2, "bad_json"), (3, "not_an_object")]
    assert rejected[0].raw == "{not json"
    batch = validate_table(table, settings=SETTINGS, source=str(path), now=NOW)
    assert batch.rejected == []
    assert batch.accepted["user_id"].to_pylist() == ["u1", "u2"]


def test_jsonl_rejections_carry_the_line_as_written(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    lines = [json.dumps(event(user_id=7)), json.dumps(event(user_id=[1])), json.dumps(event(action="clik"))]
    path.write_text("\n".join(lines))
    table, rejected = read_event_file(path)
    assert table.schema.field("user_id").type == pa.string()  # mixed types: read line by line
    batch = validate_table(table, settings=SETTINGS, source=str(path), now=NOW)
    found = sorted(rejected + batch.rejected, key=lambda r: r.record)
    assert [(r.record, r.code, r.raw) for r in found] == [(2, "wrong_type", lines[1]), (3, "unknown_action", lines[2])]
    assert batch.accepted["user_id"].to_pylist() == ["7"]


def test_jsonl_of_uniform_types_takes_the_fast_path(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    rows = [event(user_id=f"u{i}", value=i, timestamp=1714564800 + i) for i in range(5)]
    rows.append(event(action="buy", timestamp=1714564800))
    path.write_text("\n\n".join(json.dumps(r) for r in rows))  # blank lines between records
    table, rejected = read_event_file(path)
    assert rejected == []
    assert table.schema.field("value").type == pa.float64()  # typed by pyarrow's reader, not line by line
    assert table.schema.field("timestamp").type == pa.float64()
    batch = validate_table(table, settings=SETTINGS, source=str(path), now=NOW)
    assert batch.accepted.num_rows == 5
    assert [(r.record, r.code, r.raw) for r in batch.rejected] == [(11, "unknown_action", json.dumps(rows[-1]))]


def test_csv_is_read_as_text_and_validated(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "timestamp,user_id,item_id,action,value,event_id,comment\n"
        "2024-05-01T12:00:00Z,u1,i1,view,,,hello\n"
        "2024-05-01T12:00:00Z,u2,i1,click,4.5,e-2,\n"
        "2024-05-01T12:00:00Z,u3,i1,view,abc,,\n"
        "1714564800,007,i1,purchase,1,,\n"
    )
    table, rejected = read_event_file(path)
    assert rejected == []
    assert all(pa.types.is_string(t) for t in table.schema.types[:7])
    batch = validate_table(table, settings=SETTINGS, source=str(path), now=NOW)
    assert batch.accepted["user_id"].to_pylist() == ["u1", "u2", "007"]
    assert batch.accepted["value"].to_pylist() == [None, 4.5, 1.0]
    assert batch.accepted["event_id"][1].as_py() == "e-2"
    same_as_json = validate_records([event()], settings=SETTINGS, now=NOW).accepted["event_id"][0]
    assert batch.accepted["event_id"][0] == same_as_json  # a CSV row gets the id the same JSON record gets
    [bad] = batch.rejected
    assert (bad.record, bad.code) == (3, "bad_value")
    assert json.loads(bad.raw) == {
        "timestamp": "2024-05-01T12:00:00Z",
        "user_id": "u3",
        "item_id": "i1",
        "action": "view",
        "value": "abc",
        "event_id": "",
        "comment": "",
    }


def test_csv_row_with_wrong_field_count_is_rejected_and_numbering_stays_right(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "user_id,item_id,action,timestamp\n"
        "u1,i1,view,2024-05-01T12:00:00Z\n"
        "u2,i1,view\n"
        "u3,i1,clik,2024-05-01T12:00:00Z\n"
    )
    table, rejected = read_event_file(path)
    assert [(r.record, r.code, r.raw) for r in rejected] == [(2, "bad_row", "u2,i1,view")]
    batch = validate_table(table, settings=SETTINGS, source=str(path), now=NOW)
    assert [(r.record, r.code) for r in batch.rejected] == [(3, "unknown_action")]


def test_csv_without_required_columns_is_an_input_file_error(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text("user,item_id,action,ts\nu1,i1,view,2024-05-01T12:00:00Z\n")
    with pytest.raises(InputFileError) as error:
        read_event_file(path)
    message = str(error.value)
    assert "user_id, timestamp" in message
    assert "found: user, item_id, action, ts" in message


def test_raw_text_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(f"user_id,item_id,action,timestamp\nu1,{'i' * 5000},view,2024-05-01T12:00:00Z\n")
    table, _ = read_event_file(path)
    [rejection] = validate_table(table, settings=SETTINGS, source=str(path), now=NOW).rejected
    assert rejection.code == "id_too_long"
    assert len(rejection.raw) == MAX_RAW_CHARS
    assert len(rejection.reason) < 300


def test_parquet_rows_are_numbered(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    pq.write_table(pa.table({"user_id": ["u1", "u2"], "item_id": ["i", "i"], "action": ["view", "x"],
                             "timestamp": ["2024-05-01T12:00:00Z"] * 2}), path)  # fmt: skip
    table, rejected = read_event_file(path)
    batch = validate_table(table, settings=SETTINGS, source=str(path), now=NOW)
    assert rejected == []
    assert [(r.record, r.code) for r in batch.rejected] == [(2, "unknown_action")]


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("events.txt", "x", ["unknown file type '.txt'"]),
        ("events.parquet", "not parquet", ["not a readable Parquet file"]),
        ("events.json", '[{"user_id": "u1"}]', ["JSON array", "one JSON object per line"]),
        ("events.csv", "", ["has no column user_id, item_id, action, timestamp", "found: nothing"]),
    ],
)
def test_unusable_files_are_input_file_errors(tmp_path: Path, name: str, content: str, words: list[str]) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputFileError) as error:
        read_event_file(path)
    for word in words:
        assert word in str(error.value)


def test_missing_file_is_an_input_file_error(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="does not exist"):
        read_event_file(tmp_path / "nope.jsonl")


def test_jsonl_with_a_bom_and_a_line_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    good = json.dumps(event()).encode()
    path.write_bytes(b"\xef\xbb\xbf" + good + b'\n{"user_id": "\xff"}\n' + good.replace(b"u1", b"u2") + b"\n")
    table, rejected = read_event_file(path)
    assert [(r.record, r.code) for r in rejected] == [(2, "bad_json")]
    assert "not UTF-8" in rejected[0].reason
    batch = validate_table(table, settings=SETTINGS, source=str(path), now=NOW)
    assert batch.accepted["user_id"].to_pylist() == ["u1", "u2"]


# -- writing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_write_events_round_trips(tmp_path: Path, suffix: str) -> None:
    table = generate_events(GenerateSettings(seed=2, users=20, items=15, events=500, days=2, groups=3))
    path = tmp_path / "nested" / f"events{suffix}"
    write_events(table, path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    if suffix == ".parquet":
        assert pq.read_table(path).equals(table)
        return
    if suffix == ".csv":
        read = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={"timestamp": pa.string()}))
        stamps = read.column("timestamp").to_pylist()
        values = read.column("value").to_pylist()
    else:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        stamps = [record["timestamp"] for record in records]
        values = [record["value"] for record in records]
        assert [record["user_id"] for record in records] == table.column("user_id").to_pylist()
    assert all(stamp.endswith("Z") for stamp in stamps)
    assert stamps[0].count("T") == 1 and "." in stamps[0]
    assert (
        pa.array(stamps).cast(table.schema.field("timestamp").type).equals(table.column("timestamp").combine_chunks())
    )
    assert values == table.column("value").to_pylist()


def test_write_events_rejects_unknown_extension(tmp_path: Path) -> None:
    table = generate_events(GenerateSettings(seed=2, users=5, items=5, events=10, days=1, groups=2))
    with pytest.raises(InputFileError, match=r"\.parquet, \.csv, \.jsonl"):
        write_events(table, tmp_path / "events.txt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_written_events_read_back_as_the_same_events(tmp_path: Path, suffix: str) -> None:
    table = generate_events(GenerateSettings(seed=2, users=20, items=15, events=500, days=2, groups=3))
    path = tmp_path / f"events{suffix}"
    write_events(table, path)
    rows, unreadable = read_event_file(path)
    batch = validate_table(rows, settings=SETTINGS, source=str(path), now=NOW)
    assert unreadable == [] and batch.rejected == []
    assert batch.accepted.drop_columns([EVENT_ID]).cast(EVENT_SCHEMA).equals(table)
