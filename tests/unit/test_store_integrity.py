"""The store under stress from its surroundings (issue 12): writers in several threads take turns, dedup reads
only the partitions a batch can collide with and still finds every stored id, unreadable files are named and
never blamed on the records, refused records are kept once, the inbox is read once, and a window reads only
its partitions."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

import recflow.store.eventstore as store_module
import recflow.store.rejected as rejected_module
from recflow.config import EventSettings
from recflow.errors import CorruptStoreError
from recflow.events.contract import STORE_SCHEMA, Rejection, derive_event_ids, validate_table
from recflow.store.eventstore import (
    ingest_files,
    ingest_table,
    record_rejections,
    scan_store,
    store_span,
    store_summary,
)
from recflow.store.health import check_store
from recflow.store.inbox import MANIFEST, ingest_inbox, pending_files

from ..factories import event, event_line

SETTINGS = EventSettings()
NOW = datetime(2024, 6, 1, tzinfo=UTC)
DAY1, DAY2, DAY3 = "2024-05-01T12:00:00Z", "2024-05-02T12:00:00Z", "2024-05-03T12:00:00Z"


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    return {"store": tmp_path / "store", "rejected": tmp_path / "rejected"}


def table(records: list[dict[str, Any]]) -> pa.Table:
    names = dict.fromkeys(name for record in records for name in record)
    return pa.table({n: pa.array([None if r.get(n) is None else str(r[n]) for r in records]) for n in names})


def store(records: list[dict[str, Any]], dirs: dict[str, Path], source: str = "test") -> store_module.IngestReport:
    return ingest_table(table(records), source=source, settings=SETTINGS, now=NOW, **dirs)


def stored_ids(dirs: dict[str, Path]) -> list[str]:
    return sorted(scan_store(dirs["store"], columns=["event_id"])["event_id"].to_pylist())


def derived_id(record: dict[str, Any]) -> str:
    accepted = validate_table(table([record]), settings=SETTINGS, source="t", now=NOW).accepted
    return str(derive_event_ids(accepted)[0].as_py())


def corrupt_file(dirs: dict[str, Path], day: str) -> Path:
    """A file named like a store file in the partition of `day` that is not Parquet."""
    path = dirs["store"] / f"date={day}" / "part-0123456789abcdef0123456789abcdef.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PAR1 this is not a parquet file")
    return path


def read_files(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The store files each dedup check reads, recorded as it runs."""
    seen: list[list[str]] = []
    unstored = store_module._unstored

    def spy(ids: pa.ChunkedArray, files: list[Path], where: Path) -> Any:
        seen.append(sorted(f.parent.name for f in files))
        return unstored(ids, files, where)

    monkeypatch.setattr(store_module, "_unstored", spy)
    return seen


# -- one writer at a time ------------------------------------------------------------------------------------


def test_writers_in_threads_take_turns_and_store_each_event_once(dirs: dict[str, Path]) -> None:
    records = [event(user_id=f"u{i}", timestamp=1714564800 + i) for i in range(2000)]
    reports: list[store_module.IngestReport] = []
    threads = [threading.Thread(target=lambda: reports.append(store(records, dirs))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(stored_ids(dirs)) == len(set(stored_ids(dirs))) == 2000
    assert sorted(r.stored for r in reports) == [0, 0, 0, 2000]


# -- dedup bounded by the new data -----------------------------------------------------------------------


def test_a_batch_of_derived_ids_reads_only_its_own_dates(
    dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    store([event(user_id="a", timestamp=DAY1), event(user_id="b", timestamp=DAY2)], dirs)
    seen = read_files(monkeypatch)
    report = store([event(user_id="b", timestamp=DAY2), event(user_id="c", timestamp=DAY3)], dirs)
    assert (report.stored, report.duplicate) == (1, 1)
    assert seen == [["date=2024-05-02"]]  # not date=2024-05-01: no id of this batch can be there


def test_a_given_event_id_is_found_in_any_partition(dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    store([event(event_id="x1", timestamp=DAY1), event(user_id="b", timestamp=DAY2)], dirs)
    seen = read_files(monkeypatch)
    report = store([event(event_id="x1", user_id="other", timestamp=DAY3)], dirs)
    assert (report.stored, report.duplicate) == (0, 1)
    assert seen == [["date=2024-05-01", "date=2024-05-02"]]  # an id of its own can collide anywhere


def test_a_derived_id_stored_elsewhere_under_an_explicit_id_is_a_duplicate(dirs: dict[str, Path]) -> None:
    """An event stored with an explicit id equal to another event's derived id (an export edited and ingested
    again) lives in another partition than the derivation suggests: the listed files are checked too."""
    original = event(user_id="u1", timestamp=DAY1)
    store([event(user_id="u1", timestamp=DAY3, event_id=derived_id(original))], dirs)
    report = store([original], dirs)
    assert (report.stored, report.duplicate) == (0, 1)


def test_a_store_written_before_the_list_existed_gets_it_and_still_finds_every_id(dirs: dict[str, Path]) -> None:
    original = event(user_id="u1", timestamp=DAY1)
    store([event(user_id="u1", timestamp=DAY3, event_id=derived_id(original)), event(timestamp=DAY2)], dirs)
    (dirs["store"] / store_module.EXPLICIT_ID_FILES).unlink()
    report = store([original], dirs)
    assert (report.stored, report.duplicate) == (0, 1)
    listed = (dirs["store"] / store_module.EXPLICIT_ID_FILES).read_text().split()
    assert [name.split("/")[0] for name in listed] == ["date=2024-05-03"]


# -- unreadable store files ----------------------------------------------------------------------------------


def test_an_unreadable_file_in_the_batchs_partition_is_named_not_blamed_on_the_records(dirs: dict[str, Path]) -> None:
    store([event(user_id="a", timestamp=DAY1)], dirs)
    bad = corrupt_file(dirs, "2024-05-01")
    with pytest.raises(CorruptStoreError, match=str(bad)) as caught:
        store([event(user_id="b", timestamp=DAY1)], dirs)
    assert caught.value.files == (str(bad),)
    assert "recflow store check" in str(caught.value)
    assert not (dirs["rejected"]).exists()  # nothing refused: the records are fine
    report = store([event(user_id="c", timestamp=DAY2)], dirs)  # another day's partitions are not read
    assert report.stored == 1
    bad.unlink()
    assert store([event(user_id="b", timestamp=DAY1)], dirs).stored == 1


def test_store_check_and_the_summary_name_the_unreadable_files(dirs: dict[str, Path]) -> None:
    store([event(user_id="a", timestamp=DAY1), event(user_id="b", timestamp=DAY2)], dirs)
    assert check_store(dirs["store"]) == []
    bad = corrupt_file(dirs, "2024-05-02")
    [found] = check_store(dirs["store"])
    assert found.path == bad and "Parquet" in found.problem
    with pytest.raises(CorruptStoreError, match=str(bad)):
        store_summary(dirs["store"])


def test_a_window_reads_only_its_partitions(dirs: dict[str, Path]) -> None:
    store([event(user_id=u, timestamp=ts) for u, ts in [("a", DAY1), ("b", DAY2), ("c", DAY3)]], dirs)
    corrupt_file(dirs, "2024-04-20")  # outside every window below: never read
    window = scan_store(dirs["store"], start=datetime(2024, 5, 2, tzinfo=UTC), end=datetime(2024, 5, 3, 12, tzinfo=UTC))
    assert window["user_id"].to_pylist() == ["b"]  # the end is exclusive
    assert scan_store(dirs["store"], ["user_id"], start=datetime(2024, 5, 2, 13, tzinfo=UTC))[
        "user_id"
    ].to_pylist() == ["c"]
    with pytest.raises(CorruptStoreError):
        store_span(dirs["store"])  # its first partition is the corrupt one
    (dirs["store"] / "date=2024-04-20").rename(dirs["store"].parent / "moved")
    assert store_span(dirs["store"]) == (datetime(2024, 5, 1, 12, tzinfo=UTC), datetime(2024, 5, 3, 12, tzinfo=UTC))


# -- refused records kept once ----------------------------------------------------------------------------


def rejected_lines(dirs: dict[str, Path]) -> list[dict[str, Any]]:
    files = sorted(dirs["rejected"].glob("rejected-*.jsonl"))
    return [json.loads(line) for path in files for line in path.read_text().splitlines()]


def test_a_batch_delivered_again_does_not_log_its_rejects_again(tmp_path: Path, dirs: dict[str, Path]) -> None:
    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join([event_line(user_id="u1"), "{oops", event_line(action="clik"), "{oops"]) + "\n")
    first = ingest_files([path], settings=SETTINGS, now=NOW, **dirs)
    again = ingest_files([path], settings=SETTINGS, now=NOW, **dirs)
    assert (first.rejected, again.rejected) == (3, 3)  # each batch still counts what it refused
    assert again.rejected_path is None
    assert sorted(r["code"] for r in rejected_lines(dirs)) == ["bad_json", "unknown_action"]  # "{oops" once


def test_a_crash_between_the_log_and_its_keys_logs_each_record_once(
    dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    append = rejected_module._append_keys

    def crash(*args: Any) -> None:
        raise OSError("killed")

    monkeypatch.setattr(rejected_module, "_append_keys", crash)
    records = [event(action="clik"), event(user_id="")]
    with pytest.raises(OSError, match="killed"):
        store(records, dirs)
    monkeypatch.setattr(rejected_module, "_append_keys", append)
    store(records, dirs)
    store(records, dirs)
    assert len(list(dirs["rejected"].glob("rejected-*.jsonl"))) == 1
    assert len(rejected_lines(dirs)) == 2


def test_records_refused_before_the_store_are_kept_once(dirs: dict[str, Path]) -> None:
    refused = [Rejection("events.jsonl", 2, "bad_json", "not JSON: ...", "{broken")]
    path = record_rejections(refused, **dirs)
    assert path is not None and rejected_lines(dirs)[0]["raw"] == "{broken"
    assert record_rejections(refused, **dirs) is None
    assert len(rejected_lines(dirs)) == 1


# -- the inbox is read once ------------------------------------------------------------------------------


def test_the_inbox_is_read_once_and_a_changed_file_again(tmp_path: Path, dirs: dict[str, Path]) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.jsonl").write_text(event_line(user_id="u1") + "\n")
    (inbox / "notes.txt").write_text("not events")
    assert ingest_inbox(inbox, settings=SETTINGS, now=NOW, **dirs).stored == 1
    assert pending_files(inbox) == []
    assert ingest_inbox(inbox, settings=SETTINGS, now=NOW, **dirs).read == 0
    (inbox / "b.jsonl").write_text(event_line(user_id="u2") + "\n")
    (inbox / "a.jsonl").write_text(event_line(user_id="u1") + "\n" + event_line(user_id="u3") + "\n")
    assert pending_files(inbox) == [inbox / "a.jsonl", inbox / "b.jsonl"]
    report = ingest_inbox(inbox, settings=SETTINGS, now=NOW, **dirs)
    assert (report.read, report.stored, report.duplicate) == (3, 2, 1)
    assert len((inbox / MANIFEST).read_text().splitlines()) == 3


def test_schema_of_a_window_read_is_the_stores(dirs: dict[str, Path]) -> None:
    store([event(timestamp=DAY1)], dirs)
    assert scan_store(dirs["store"], start=datetime(2030, 1, 1, tzinfo=UTC)).schema == STORE_SCHEMA
