"""The consumer over the local spool (the same code path as Redis; tests/integration/test_stream.py runs it
against real redis-servers and real killed processes): every entry ends stored, duplicate, rejected with
its reason, or dead-lettered with its reason."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from recflow.config import Settings
from recflow.errors import StoreWriteError
from recflow.store.eventstore import scan_store
from recflow.stream.consumer import DrainReport, drain
from recflow.stream.log import open_event_log, open_event_source

from ..factories import numbered_events


@pytest.fixture(autouse=True)
def _no_redis_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECFLOW_REDIS_URL", raising=False)


def stored_ids(root: Path) -> list[str]:
    return scan_store(root / "data/events", columns=["event_id"])["event_id"].to_pylist()


def dead_letters(root: Path) -> list[dict[str, object]]:
    path = root / "spool" / "dead-letter.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def adds_up(report: DrainReport) -> bool:
    return report.read == report.stored + report.duplicate + report.rejected + report.dead_lettered


def test_drain_stores_every_event_once_and_acknowledges_it(tmp_path: Path) -> None:
    settings = Settings().replace("eventlog", batch_size=300)
    open_event_log(settings.eventlog, tmp_path).append(numbered_events(1000))
    lags: list[int | None] = []
    report = drain(settings, root=tmp_path, on_batch=lambda r: lags.append(r.lag.total if r.lag else None))
    assert (report.read, report.stored, report.batches) == (1000, 1000, 4)
    assert lags == [700, 400, 100, 0]  # the lag after each batch
    assert sorted(stored_ids(tmp_path)) == sorted(f"e{i}" for i in range(1000))
    assert report.lag is not None and report.lag.total == 0
    again = drain(settings, root=tmp_path)
    assert again.read == 0 and len(stored_ids(tmp_path)) == 1000


def test_replayed_events_are_counted_as_duplicates(tmp_path: Path) -> None:
    settings = Settings()
    log = open_event_log(settings.eventlog, tmp_path)
    log.append(numbered_events(100))
    drain(settings, root=tmp_path)
    log.append(numbered_events(150))  # a producer retried: the first 100 again
    report = drain(settings, root=tmp_path)
    assert (report.read, report.stored, report.duplicate) == (150, 50, 100)
    assert len(stored_ids(tmp_path)) == 150


def test_invalid_events_go_to_the_rejected_log_not_the_dead_letters(tmp_path: Path) -> None:
    settings = Settings()
    bad = [{"user_id": "u", "item_id": "i", "action": "clik", "timestamp": 1_700_000_000}, ["not", "an", "object"]]
    open_event_log(settings.eventlog, tmp_path).append([*numbered_events(10), *bad])  # type: ignore[list-item]
    report = drain(settings, root=tmp_path)
    assert (report.stored, report.rejected, report.dead_lettered) == (10, 2, 0)
    assert report.reasons == {"unknown_action": 1, "not_an_object": 1}
    [path] = report.rejected_paths
    reasons = [json.loads(line)["reason"] for line in path.read_text().splitlines()]
    assert any("clik" in reason for reason in reasons)
    assert dead_letters(tmp_path) == [] and adds_up(report)


def test_lines_that_are_not_json_are_rejected_with_their_reason_and_do_not_block_the_rest(tmp_path: Path) -> None:
    settings = Settings()
    log = open_event_log(settings.eventlog, tmp_path)
    log.append(numbered_events(5))
    with (tmp_path / "spool" / "events.jsonl").open("ab") as out:
        out.write(b"{not json\n\xff\xfe\n")  # e.g. written by hand, or a torn line healed by the next writer
    log.append(numbered_events(5, start=5))
    report = drain(settings, root=tmp_path)
    assert (report.stored, report.rejected, report.dead_lettered) == (10, 2, 0) and adds_up(report)
    assert report.reasons == {"bad_json": 2}
    [path] = report.rejected_paths
    rejected = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["record"] for r in rejected] == [6, 7]  # positions in the batch, whose first entry the source names
    assert rejected[0]["raw"] == "{not json" and "not valid JSON" in rejected[0]["reason"]
    assert rejected[0]["source"].startswith(f"spool {tmp_path / 'spool' / 'events.jsonl'} entries 0..")


def test_a_record_the_store_cannot_take_is_isolated_and_dead_lettered(tmp_path: Path) -> None:
    # A lone UTF-16 surrogate is valid JSON ("\ud800") but not encodable as UTF-8: ingest raises for the
    # whole batch. The consumer splits the batch until that record stands alone.
    settings = Settings()
    poison = {"user_id": "u\ud800", "item_id": "i", "action": "view", "timestamp": 1_700_000_000}
    open_event_log(settings.eventlog, tmp_path).append(
        [*numbered_events(500), poison, *numbered_events(499, start=500)]
    )
    report = drain(settings, root=tmp_path)
    assert (report.stored, report.dead_lettered) == (999, 1) and adds_up(report)
    [dead] = dead_letters(tmp_path)
    assert str(dead["reason"]).startswith("store failed: UnicodeEncodeError")
    assert json.loads(str(dead["raw"]))["user_id"] == "u\ud800"


def test_an_entry_that_keeps_killing_its_consumer_is_stored_alone_then_dead_lettered(tmp_path: Path) -> None:
    settings = Settings().replace("eventlog", max_deliveries=3)
    open_event_log(settings.eventlog, tmp_path).append(numbered_events(3))

    def deliver_and_die() -> None:  # a consumer that read the batch and was killed before acknowledging it
        source = open_event_source(settings.eventlog, tmp_path)
        assert source.recover(10) or source.read_new(10, None)
        source.close()

    deliver_and_die()
    deliver_and_die()  # delivered twice; the next delivery is the third: stored one by one
    report = drain(settings, root=tmp_path)
    assert (report.stored, report.dead_lettered) == (3, 0)

    open_event_log(settings.eventlog, tmp_path).append(numbered_events(2, start=3))
    for _ in range(3):  # the third time, the consumer stores them one by one and dies on the first, e3
        deliver_and_die()
    report = drain(settings, root=tmp_path)  # fourth delivery: past max_deliveries
    assert (report.stored, report.dead_lettered) == (1, 1) and adds_up(report)
    [dead] = dead_letters(tmp_path)
    assert str(dead["reason"]).startswith("crashed: delivered 4 times")
    assert json.loads(str(dead["raw"]))["event_id"] == "e3"  # only the one it died on; e4 is stored
    assert "e4" in stored_ids(tmp_path)


def test_an_unwritable_store_dead_letters_nothing_and_keeps_the_entries(tmp_path: Path) -> None:
    settings = Settings()
    open_event_log(settings.eventlog, tmp_path).append(numbered_events(20))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "events").write_text("a file where the store folder should be")
    for _ in range(settings.eventlog.max_deliveries + 2):  # failures of the store are not the entries' fault
        with pytest.raises(StoreWriteError, match="data/events"):
            drain(settings, root=tmp_path)
    (tmp_path / "data" / "events").unlink()
    report = drain(settings, root=tmp_path)
    assert (report.stored, report.dead_lettered) == (20, 0)


def test_follow_stores_new_events_until_stopped(tmp_path: Path) -> None:
    settings = Settings().replace("eventlog", block_ms=100, linger_ms=50)
    stop = threading.Event()
    reports: list[DrainReport] = []
    thread = threading.Thread(target=lambda: reports.append(drain(settings, root=tmp_path, follow=True, stop=stop)))
    thread.start()
    log = open_event_log(settings.eventlog, tmp_path)
    for k in range(3):
        log.append(numbered_events(10, start=10 * k))
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while len(stored_ids(tmp_path)) < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    [report] = reports
    assert report.stored == 30 and report.batches >= 2


def test_published_files_of_every_format_are_stored_as_recflow_ingest_would(tmp_path: Path) -> None:
    import pyarrow as pa

    from recflow.events.fileio import write_events
    from recflow.store.eventstore import ingest_files
    from recflow.stream.log import publish_file

    settings = Settings()
    table = pa.table(
        {
            "user_id": ["u1", "u2", "u3"],
            "item_id": ["i1", "i2", "i3"],
            "action": ["view", "purchase", "clik"],
            "timestamp": pa.array([1_700_000_000_000, 1_700_000_001_500, 1_700_000_002_000], pa.timestamp("ms", "UTC")),
            "value": [None, 2.5, None],
        }
    )
    log = open_event_log(settings.eventlog, tmp_path)
    for suffix in (".parquet", ".csv", ".jsonl"):
        write_events(table, tmp_path / f"events{suffix}")
        assert publish_file(log, tmp_path / f"events{suffix}").published == 3
    report = drain(settings, root=tmp_path)
    assert (report.read, report.stored, report.duplicate, report.rejected) == (9, 2, 4, 3)
    direct = ingest_files([tmp_path / "events.parquet"], store=tmp_path / "direct", rejected=tmp_path / "rej",
                          settings=settings.events)  # fmt: skip
    assert sorted(stored_ids(tmp_path)) == sorted(scan_store(tmp_path / "direct")["event_id"].to_pylist())
    assert direct.stored == 2


def test_eventlog_settings_refuse_what_cannot_work() -> None:
    from recflow.config import EventLogSettings
    from recflow.errors import ConfigError

    with pytest.raises(ConfigError, match=r"eventlog\.batch_size must be at least 1"):
        EventLogSettings(batch_size=0)
    with pytest.raises(ConfigError, match="dead_letter_stream must differ"):
        EventLogSettings(stream="s", dead_letter_stream="s")
    assert EventLogSettings().resolved({"RECFLOW_REDIS_URL": "redis://h:1/0"}).redis_url == "redis://h:1/0"
    assert EventLogSettings(redis_url="redis://a:1/0").resolved({}).redis_url == "redis://a:1/0"


def test_ingesting_json_lines_from_memory_is_ingesting_the_same_jsonl_file(tmp_path: Path) -> None:
    from recflow.store.eventstore import ingest_files, ingest_json_lines

    lines = [json.dumps(e) for e in numbered_events(5)] + ["{broken", '{"user_id": "u", "action": "view"}', "[1, 2]"]
    lines += ['{"user_id": "u", "item_id": "i", "action": "view", "timestamp": "2024-01-01T00:00:00"}']  # naive
    data = ("\n".join(lines) + "\n").encode()
    (tmp_path / "batch.jsonl").write_bytes(data)
    settings = Settings().events
    from_file = ingest_files(
        [tmp_path / "batch.jsonl"], store=tmp_path / "a", rejected=tmp_path / "ra", settings=settings
    )
    in_memory = ingest_json_lines(
        data, source="stream", store=tmp_path / "b", rejected=tmp_path / "rb", settings=settings
    )
    assert (in_memory.read, in_memory.stored, in_memory.rejected) == (
        from_file.read,
        from_file.stored,
        from_file.rejected,
    )
    assert in_memory.reasons == from_file.reasons == {
        "bad_json": 1, "missing_field": 1, "not_an_object": 1, "naive_timestamp": 1
    }  # fmt: skip
    assert scan_store(tmp_path / "a").equals(scan_store(tmp_path / "b"))
    [path] = in_memory.rejected_paths
    assert [json.loads(line)["record"] for line in path.read_text().splitlines()] == [6, 7, 8, 9]


def corrupt_partition_file(root: Path, day: str) -> Path:
    path = root / "data" / "events" / f"date={day}" / "part-0123456789abcdef0123456789abcdef.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PAR1 not parquet")
    return path


def test_an_unreadable_store_file_stops_the_consumer_and_dead_letters_nothing(tmp_path: Path) -> None:
    """Regression (issue 12): a corrupt file in a date partition made `recflow consume` exit 0 and dead-letter
    every new event of that date."""
    settings = Settings()
    open_event_log(settings.eventlog, tmp_path).append(numbered_events(1000))  # 2023-11-14 and -15
    bad = corrupt_partition_file(tmp_path, "2023-11-14")
    for _ in range(settings.eventlog.max_deliveries + 2):  # never counted as the entries' fault
        with pytest.raises(StoreWriteError, match=f"cannot be read: {bad}") as caught:
            drain(settings, root=tmp_path)
        assert "nothing was dead-lettered or acknowledged" in str(caught.value)
    assert dead_letters(tmp_path) == [] and not (tmp_path / "data" / "rejected").exists()
    bad.unlink()
    report = drain(settings, root=tmp_path)
    assert (report.read, report.stored, report.dead_lettered) == (1000, 1000, 0)


@pytest.mark.parametrize(
    ("fault", "says"),
    [
        (OSError(28, "No space left on device"), "the disk is full"),
        (PermissionError(13, "Permission denied"), "permission denied"),
        (MemoryError(), "out of memory"),
    ],
)
def test_faults_of_the_environment_keep_the_entries_in_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: BaseException, says: str
) -> None:
    import recflow.store.eventstore as store_module

    settings = Settings()
    open_event_log(settings.eventlog, tmp_path).append(numbered_events(50))
    real = store_module._write_file

    def failing(*args: object) -> None:
        raise fault

    monkeypatch.setattr(store_module, "_write_file", failing)
    for _ in range(settings.eventlog.max_deliveries + 2):
        with pytest.raises(StoreWriteError, match=says):
            drain(settings, root=tmp_path)
    assert dead_letters(tmp_path) == []
    monkeypatch.setattr(store_module, "_write_file", real)
    report = drain(settings, root=tmp_path)
    assert (report.stored, report.dead_lettered) == (50, 0)
    assert sorted(stored_ids(tmp_path)) == sorted(f"e{i}" for i in range(50))


def test_follow_retries_a_fault_of_the_environment_until_it_is_fixed(tmp_path: Path) -> None:
    settings = Settings().replace("eventlog", block_ms=100, linger_ms=50)
    open_event_log(settings.eventlog, tmp_path).append(numbered_events(100))
    bad = corrupt_partition_file(tmp_path, "2023-11-14")
    stop = threading.Event()
    result: list[DrainReport] = []
    thread = threading.Thread(target=lambda: result.append(drain(settings, root=tmp_path, follow=True, stop=stop)))
    thread.start()
    time.sleep(1.5)  # it retries meanwhile, with back-off
    assert list((tmp_path / "data" / "events").glob("date=*/part-*.parquet")) == [bad]
    assert dead_letters(tmp_path) == []
    bad.unlink()
    deadline = time.monotonic() + 30
    while len(stored_ids(tmp_path)) < 100 and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    thread.join(timeout=30)
    assert (result[0].stored, result[0].dead_lettered) == (100, 0)


def test_a_batch_delivered_again_does_not_log_its_rejects_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 12): after re-deliveries the rejected log held 289 lines for 240 rejected records."""
    from recflow.stream.spool import SpoolLog

    settings = Settings()
    bad = [{"user_id": f"u{i}", "item_id": "i", "action": "clik", "timestamp": 1_700_000_000} for i in range(40)]
    open_event_log(settings.eventlog, tmp_path).append(numbered_events(100) + bad)
    ack = SpoolLog.ack

    def crash(self: SpoolLog, entries: object) -> None:
        raise OSError("killed before the ack")

    monkeypatch.setattr(SpoolLog, "ack", crash)
    with pytest.raises(OSError, match="killed"):
        drain(settings, root=tmp_path)
    monkeypatch.setattr(SpoolLog, "ack", ack)
    again = drain(settings, root=tmp_path)  # the same batch, delivered a second time
    assert (again.read, again.duplicate, again.rejected) == (140, 100, 40)
    lines = [line for f in (tmp_path / "data/rejected").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert len(lines) == 40
