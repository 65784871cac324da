"""The event store: append-only, partitioned by UTC date, deduplicated by event_id, written atomically,
and every record accounted for in the report and the rejected log."""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import recflow.store.eventstore as store_module
from recflow.config import EventSettings
from recflow.constants import REQUIRED_COLUMNS
from recflow.errors import InputFileError
from recflow.events.contract import STORE_SCHEMA
from recflow.store.eventstore import IngestReport, ingest_files, ingest_table, scan_store, store_summary

from ..factories import event_line

SETTINGS = EventSettings()
NOW = datetime(2024, 6, 1, tzinfo=UTC)


def line(user: str, item: str = "i1", action: str = "view", ts: str = "2024-05-01T12:00:00Z", **extra: Any) -> str:
    return event_line(user_id=user, item_id=item, action=action, timestamp=ts, **extra)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    return {"store": tmp_path / "store", "rejected": tmp_path / "rejected"}


def ingest(paths: list[Path], dirs: dict[str, Path], **kwargs: Any) -> IngestReport:
    return ingest_files(paths, settings=SETTINGS, now=NOW, **dirs, **kwargs)


def text_table(records: list[dict[str, Any]]) -> pa.Table:
    """JSON-like records as a table of text columns (as a CSV file reads), the required columns always present."""
    names = dict.fromkeys([*REQUIRED_COLUMNS, *(name for record in records for name in record)])
    columns = {n: [None if r.get(n) is None else str(r[n]) for r in records] for n in names}
    return pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})


def store_records(records: list[dict[str, Any]], *, source: str, **kwargs: Any) -> IngestReport:
    """Records from a JSON body, through the one in-memory entry of the store (`ingest_table`)."""
    return ingest_table(text_table(records), source=source, **kwargs)


def visible_files(root: Path) -> list[str]:
    """Every file of a store but its bookkeeping (the writers' lock, the list of files with explicit ids)."""
    bookkeeping = {root / store_module.LOCK_FILE, root / store_module.EXPLICIT_ID_FILES}
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p not in bookkeeping)


def test_same_file_twice_stores_nothing_the_second_time(tmp_path: Path, dirs: dict[str, Path]) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [line("u1"), line("u2"), line("u3", action="clik")])
    first = ingest([path], dirs)
    second = ingest([path], dirs)
    assert (first.read, first.stored, first.duplicate, first.rejected) == (3, 2, 0, 1)
    assert (second.read, second.stored, second.duplicate, second.rejected) == (3, 0, 2, 1)
    assert scan_store(dirs["store"]).num_rows == 2


def test_overlapping_files_store_each_event_once(tmp_path: Path, dirs: dict[str, Path]) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [line("u1"), line("u2"), line("u3")])
    b = write_jsonl(tmp_path / "b.jsonl", [line("u2"), line("u3"), line("u4")])
    seen: list[tuple[str, int]] = []
    report = ingest([a, b], dirs, on_file=lambda path, r: seen.append((path.name, r.stored)))
    assert seen == [("a.jsonl", 3), ("b.jsonl", 1)]
    assert (report.read, report.stored, report.duplicate) == (6, 4, 2)
    assert sorted(scan_store(dirs["store"])["user_id"].to_pylist()) == ["u1", "u2", "u3", "u4"]


def test_duplicates_within_a_batch_keep_the_first(dirs: dict[str, Path]) -> None:
    records = [
        {"user_id": "u1", "item_id": "i1", "action": "view", "timestamp": "2024-05-01T12:00:00Z"},
        {"user_id": "u1", "item_id": "i1", "action": "view", "timestamp": 1714564800},  # same event, other form
        {"event_id": "e1", "user_id": "u2", "item_id": "i1", "action": "view", "timestamp": 1714564800},
        {"event_id": "e1", "user_id": "u3", "item_id": "i9", "action": "click", "timestamp": 1714564801},
    ]
    report = store_records(records, source="request", settings=SETTINGS, now=NOW, **dirs)
    assert (report.read, report.stored, report.duplicate, report.rejected) == (4, 2, 2, 0)
    stored = scan_store(dirs["store"]).to_pylist()
    assert sorted(r["user_id"] for r in stored) == ["u1", "u2"]


def test_resent_event_id_with_another_timestamp_is_a_duplicate(dirs: dict[str, Path]) -> None:
    base = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "action": "view"}
    store_records([{**base, "timestamp": "2024-05-01T12:00:00Z"}], source="r", settings=SETTINGS, now=NOW, **dirs)
    again = store_records([{**base, "timestamp": "2024-05-03T12:00:00Z"}], source="r", settings=SETTINGS, now=NOW,
                           **dirs)  # fmt: skip
    assert (again.stored, again.duplicate) == (0, 1)
    assert scan_store(dirs["store"])["timestamp"].to_pylist() == [datetime(2024, 5, 1, 12, tzinfo=UTC)]


def test_dedup_stays_exact_when_different_ids_share_a_hash(
    dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dedup hashes event ids to find the rows that can repeat; a hash collision must not drop an event."""
    unstored = store_module._unstored

    def colliding(ids: pa.ChunkedArray, stored: list[Path], store: Path) -> tuple[np.ndarray, np.ndarray]:
        rows, hashes = unstored(ids, stored, store)
        return rows, np.zeros_like(hashes)  # every id gets the same hash

    monkeypatch.setattr(store_module, "_unstored", colliding)

    def records(ids: list[str], first_user: int) -> list[dict[str, Any]]:
        return [{"event_id": e, "user_id": f"u{first_user + i}", "item_id": "i1", "action": "view",
                 "timestamp": 1714564800 + i} for i, e in enumerate(ids)]  # fmt: skip

    first = store_records(records(["e1", "e2", "e1", "e3", "e2", "e4"], 0), source="a", settings=SETTINGS,
                           now=NOW, **dirs)  # fmt: skip
    second = store_records(records(["e4", "e5", "e6", "e5"], 10), source="b", settings=SETTINGS, now=NOW, **dirs)
    assert (first.stored, first.duplicate, second.stored, second.duplicate) == (4, 2, 2, 2)
    stored = scan_store(dirs["store"]).sort_by("event_id")
    assert stored["event_id"].to_pylist() == ["e1", "e2", "e3", "e4", "e5", "e6"]
    assert stored["user_id"].to_pylist() == ["u0", "u1", "u3", "u5", "u11", "u12"]  # the first of each id


def test_file_names_depend_only_on_the_stored_events(tmp_path: Path) -> None:
    """The same events stored give the same file names and bytes (a fresh clone reproduces data.dvc), whatever
    else the batch held; other events give other names."""
    events = [line("u1"), line("u2", ts="2024-05-02T08:00:00Z"), line("u3")]
    noisy = [line("u1"), line("u9", action="clik"), events[1], line("u1"), events[2]]

    def store_files(name: str, lines: list[str]) -> dict[str, bytes]:
        store = tmp_path / name
        ingest_files([write_jsonl(tmp_path / f"{name}.jsonl", lines)], store=store, rejected=tmp_path / "rejected",
                     settings=SETTINGS, now=NOW)  # fmt: skip
        return {f: (store / f).read_bytes() for f in visible_files(store)}

    clean = store_files("clean", events)
    assert store_files("noisy", noisy) == clean
    assert set(store_files("other", events[:2])).isdisjoint(clean)


def test_partitions_are_utc_dates(tmp_path: Path, dirs: dict[str, Path]) -> None:
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            line("u1", ts="2024-05-01T23:30:00-02:00"),
            line("u2", ts="2024-05-01T01:30:00+02:00"),
            line("u3"),
            line("u1", ts="2024-05-02T01:30:00Z"),  # the first event again, in UTC
        ],
    )
    report = ingest([path], dirs)
    assert (report.stored, report.duplicate) == (3, 1)
    files = visible_files(dirs["store"])
    assert [f.split("/")[0] for f in files] == ["date=2024-04-30", "date=2024-05-01", "date=2024-05-02"]
    assert all(re.fullmatch(r"date=[\d-]+/part-[0-9a-f]{32}\.parquet", f) for f in files)
    assert len({f.split("/")[1] for f in files}) == 1  # one batch, one uuid


def test_rejected_log_holds_every_rejection(tmp_path: Path, dirs: dict[str, Path]) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [line("u1"), "{oops", line("u2", action="clik"), line("")])
    report = ingest([path], dirs)
    assert report.reasons == {"bad_json": 1, "unknown_action": 1, "empty_id": 1}
    assert report.rejected_path is not None
    assert re.fullmatch(r"rejected-\d{8}T\d{12}Z-[0-9a-f]{16}\.jsonl", report.rejected_path.name)
    logged = [json.loads(text) for text in report.rejected_path.read_text().splitlines()]
    assert [(r["source"], r["record"], r["code"]) for r in logged] == [
        (str(path), 2, "bad_json"),
        (str(path), 3, "unknown_action"),
        (str(path), 4, "empty_id"),
    ]
    assert logged[1]["raw"] == line("u2", action="clik")
    assert logged[1]["reason"].startswith("action 'clik' is not one of view, click")
    assert set(logged[0]) == {"source", "record", "code", "reason", "raw"}


def test_no_rejected_log_without_rejections(tmp_path: Path, dirs: dict[str, Path]) -> None:
    report = ingest([write_jsonl(tmp_path / "a.jsonl", [line("u1")])], dirs)
    assert report.rejected_path is None
    assert not dirs["rejected"].exists()


def test_rejected_log_escapes_awkward_text(dirs: dict[str, Path]) -> None:
    awkward = 'a"b\\c\nd\x01é'
    report = store_records([{"user_id": awkward, "item_id": "i", "action": awkward, "timestamp": 1714564800}],
                            source='src "x"', settings=SETTINGS, now=NOW, **dirs)  # fmt: skip
    assert report.rejected_path is not None
    [logged] = [json.loads(text) for text in report.rejected_path.read_text(encoding="utf-8").splitlines()]
    assert logged["source"] == 'src "x"'
    assert json.loads(logged["raw"])["user_id"] == awkward


def test_failed_rename_leaves_no_partial_files_and_a_retry_stores_everything_once(
    tmp_path: Path, dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    days = [f"2024-05-0{d}T12:00:00Z" for d in (1, 2, 3)]
    path = write_jsonl(tmp_path / "a.jsonl", [line(f"u{i}", ts=days[i % 3]) for i in range(30)])
    real_replace = os.replace
    calls = []

    def flaky_replace(src: Any, dst: Any) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(store_module.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk full"):
        ingest([path], dirs)
    monkeypatch.setattr(store_module.os, "replace", real_replace)
    committed = visible_files(dirs["store"])
    assert len(committed) == 1 and not any(name.split("/")[-1].startswith(".") for name in committed)
    assert scan_store(dirs["store"]).num_rows == 10  # one whole partition, nothing half written

    retry = ingest([path], dirs)
    assert (retry.stored, retry.duplicate) == (20, 10)
    events = scan_store(dirs["store"])
    assert events.num_rows == 30
    assert pc.count_distinct(events["event_id"]).as_py() == 30


def test_failed_write_leaves_nothing_visible(
    tmp_path: Path, dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [line("u1"), line("u2", ts="2024-05-02T12:00:00Z")])

    def crash(table: pa.Table, sink: Any, **options: Any) -> None:
        sink.write(b"PAR1 half a file")
        raise OSError("killed")

    monkeypatch.setattr(store_module.pq, "write_table", crash)
    with pytest.raises(OSError, match="killed"):
        ingest([path], dirs)
    assert visible_files(dirs["store"]) == []
    assert scan_store(dirs["store"]).num_rows == 0


def test_scan_store_round_trip(tmp_path: Path, dirs: dict[str, Path]) -> None:
    path = tmp_path / "a.csv"
    path.write_text(
        "user_id,item_id,action,timestamp,value,event_id\n"
        "u1,i1,purchase,2024-05-02T10:00:00+02:00,2.5,e1\n"
        "u2,i2,view,1714564800000,,e2\n"
    )
    ingest([path], dirs)
    table = scan_store(dirs["store"])
    assert table.schema == STORE_SCHEMA
    assert table.to_pylist() == [
        {"event_id": "e2", "user_id": "u2", "item_id": "i2", "action": "view",
         "timestamp": datetime(2024, 5, 1, 12, tzinfo=UTC), "value": None},
        {"event_id": "e1", "user_id": "u1", "item_id": "i1", "action": "purchase",
         "timestamp": datetime(2024, 5, 2, 8, tzinfo=UTC), "value": 2.5},
    ]  # fmt: skip
    assert scan_store(dirs["store"], columns=["user_id", "timestamp"]).column_names == ["user_id", "timestamp"]


def test_scan_of_an_empty_or_missing_store(tmp_path: Path) -> None:
    assert scan_store(tmp_path / "nothing").schema == STORE_SCHEMA
    assert scan_store(tmp_path / "nothing").num_rows == 0
    assert scan_store(tmp_path, columns=["item_id"]).column_names == ["item_id"]
    with pytest.raises(ValueError, match="unknown store column"):
        scan_store(tmp_path, columns=["user"])


def test_store_summary(tmp_path: Path, dirs: dict[str, Path]) -> None:
    assert store_summary(dirs["store"]).events == 0
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [line("u1", "i1"), line("u1", "i2", ts="2024-05-03T00:00:00Z"), line("u2", "i1", ts="2024-05-01T00:00:00Z")],
    )
    ingest([path], dirs)
    summary = store_summary(dirs["store"])
    assert (summary.events, summary.users, summary.items, summary.partitions, summary.files) == (3, 2, 2, 2, 2)
    assert summary.first == datetime(2024, 5, 1, tzinfo=UTC)
    assert summary.last == datetime(2024, 5, 3, tzinfo=UTC)


def test_ingest_table_and_counts_add_up(dirs: dict[str, Path]) -> None:
    table = pa.table(
        {
            "user_id": ["u1", "u2", "", "u1"],
            "item_id": ["i1", "i1", "i1", "i1"],
            "action": ["view", "view", "view", "view"],
            "timestamp": ["2024-05-01T12:00:00Z"] * 4,
        }
    )
    report = ingest_table(table, source="frame", settings=SETTINGS, now=NOW, **dirs)
    assert (report.read, report.stored, report.duplicate, report.rejected) == (4, 2, 1, 1)
    assert report.read == report.stored + report.duplicate + report.rejected


def test_a_folder_means_its_event_files(tmp_path: Path, dirs: dict[str, Path]) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_jsonl(inbox / "b.jsonl", [line("u2")])
    write_jsonl(inbox / "a.json", [line("u1")])
    (inbox / "notes.txt").write_text("not events")
    (inbox / ".hidden.jsonl").write_text("{broken")
    names: list[str] = []
    report = ingest([inbox], dirs, on_file=lambda path, r: names.append(path.name))
    assert names == ["a.json", "b.jsonl"]
    assert (report.stored, report.rejected) == (2, 0)


def test_nothing_to_ingest_is_an_input_file_error(tmp_path: Path, dirs: dict[str, Path]) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="nothing to ingest"):
        ingest([tmp_path / "empty"], dirs)
    good = write_jsonl(tmp_path / "a.jsonl", [line("u1")])
    with pytest.raises(InputFileError, match="does not exist"):
        ingest([good, tmp_path / "missing.csv"], dirs)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputFileError, match="unknown file type"):
        ingest([good, tmp_path / "notes.txt"], dirs)
    assert not dirs["store"].exists()  # checked before anything was written


def test_report_must_add_up_and_reports_combine() -> None:
    with pytest.raises(ValueError, match="does not add up"):
        IngestReport(read=3, stored=1, duplicate=1, rejected=0)
    with pytest.raises(ValueError, match="reasons"):
        IngestReport(read=1, stored=0, duplicate=0, rejected=1, reasons={})
    a = IngestReport(read=3, stored=1, duplicate=1, rejected=1, reasons={"bad_json": 1}, rejected_path=Path("a"))
    b = IngestReport(read=2, stored=0, duplicate=0, rejected=2, reasons={"bad_json": 1, "empty_id": 1},
                     rejected_path=Path("b"))  # fmt: skip
    total = a + b
    assert (total.read, total.stored, total.duplicate, total.rejected) == (5, 1, 1, 3)
    assert total.reasons == {"bad_json": 2, "empty_id": 1}
    assert total.rejected_paths == (Path("a"), Path("b"))
    assert total.rejected_path == Path("b")
    assert (IngestReport() + a).rejected_paths == (Path("a"),)


@pytest.mark.parametrize(("name", "content"), [("a.csv", "user_id,item_id,action,timestamp\n"), ("a.jsonl", "")])
def test_empty_files_ingest_nothing(tmp_path: Path, dirs: dict[str, Path], name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    report = ingest([path], dirs)
    assert (report.read, report.stored, report.duplicate, report.rejected) == (0, 0, 0, 0)
    assert scan_store(dirs["store"]).num_rows == 0
    assert store_records([], source="request", settings=SETTINGS, now=NOW, **dirs).read == 0
