"""The event-log contract, run over both implementations (Redis Streams on a private redis-server, and the
local spool), then what is particular to Redis: trimming, dead consumers, a lost consumer group. What is
particular to the spool (torn lines, compaction, the single-consumer lock) is in tests/unit/test_spool.py."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from recflow.config import EventLogSettings
from recflow.errors import EventLogUnavailableError
from recflow.stream.log import EventSource, encode, open_event_log, open_event_source

from ..factories import numbered_events
from ..redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _no_redis_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECFLOW_REDIS_URL", raising=False)


@dataclass
class Backend:
    kind: str
    settings: EventLogSettings
    root: Path
    server: RedisServer | None = None

    def source(self, consumer: str = "c1") -> EventSource:
        return open_event_source(self.settings, self.root, consumer=consumer)

    def dead_letters(self) -> list[tuple[bytes, str]]:
        if self.server is not None:
            entries = self.server.client().xrange(self.settings.dead_letter_stream)
            return [(fields[b"event"], fields[b"reason"].decode()) for _, fields in entries]
        path = self.root / self.settings.spool / "dead-letter.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [(line["raw"].encode(), line["reason"]) for line in lines]


def settings_for_test() -> EventLogSettings:
    tag = uuid.uuid4().hex[:8]
    return EventLogSettings(stream=f"test:{tag}", dead_letter_stream=f"test:{tag}:dead", claim_idle_ms=100)


@pytest.fixture
def redis_backend(redis_server: RedisServer, tmp_path: Path) -> Backend:
    return Backend("redis", replace(settings_for_test(), redis_url=redis_server.url), tmp_path, redis_server)


@pytest.fixture(params=["redis", "spool"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "redis":
        return request.getfixturevalue("redis_backend")
    return Backend("spool", settings_for_test(), tmp_path)


# -- the contract, over both implementations --------------------------------------------------------------


def test_appended_records_are_read_back_in_order_once(backend: Backend) -> None:
    log = open_event_log(backend.settings, backend.root)
    assert log.append(numbered_events(5)) == 5
    assert log.append(numbered_events(3, start=5)) == 3
    source = backend.source()
    got = source.read_new(100, None)
    assert [e.raw for e in got] == [encode(r) for r in numbered_events(8)]
    assert all(e.deliveries == 1 for e in got)
    assert source.read_new(100, None) == []  # delivered once
    source.close()


def test_read_new_respects_count_and_waits_at_most_block_ms(backend: Backend) -> None:
    open_event_log(backend.settings, backend.root).append(numbered_events(5))
    source = backend.source()
    assert len(source.read_new(2, None)) == 2
    assert len(source.read_new(10, None)) == 3
    started = time.monotonic()
    assert source.read_new(10, 300) == []
    assert 0.25 < time.monotonic() - started < 2.0
    source.close()


def test_a_blocked_read_returns_as_soon_as_an_event_arrives(backend: Backend) -> None:
    source = backend.source()
    log = open_event_log(backend.settings, backend.root)
    threading.Timer(0.2, lambda: log.append(numbered_events(1))).start()
    started = time.monotonic()
    got = source.read_new(10, 5000)
    assert len(got) == 1 and time.monotonic() - started < 2.0
    source.close()


def test_unacknowledged_entries_come_back_after_a_restart_with_their_delivery_count(backend: Backend) -> None:
    open_event_log(backend.settings, backend.root).append(numbered_events(4))
    first = backend.source()
    got = first.read_new(10, None)
    first.ack(got[:2])
    first.close()  # "crash": entries 3 and 4 never acknowledged
    second = backend.source()
    again = second.recover(10)
    assert [e.raw for e in again] == [e.raw for e in got[2:]]
    assert [e.deliveries for e in again] == [2, 2]
    second.close()
    third = backend.source()
    again = third.recover(10)
    assert [e.deliveries for e in again] == [3, 3]
    third.ack(again)
    assert third.recover(10) == []
    third.close()


def test_acknowledged_entries_are_never_delivered_again(backend: Backend) -> None:
    log = open_event_log(backend.settings, backend.root)
    log.append(numbered_events(3))
    source = backend.source()
    source.ack(source.read_new(10, None))
    source.close()
    source = backend.source()
    assert source.recover(10) == [] and source.read_new(10, None) == []
    log.append(numbered_events(1, start=3))
    assert [json.loads(e.raw or b"")["event_id"] for e in source.read_new(10, None)] == ["e3"]
    source.close()


def test_dead_letters_keep_the_record_and_the_reason_and_are_acknowledged(backend: Backend) -> None:
    open_event_log(backend.settings, backend.root).append(numbered_events(3))
    source = backend.source()
    got = source.read_new(10, None)
    source.dead_letter([(got[1], "undecodable: test")])
    source.ack([got[0], got[2]])
    source.close()
    assert backend.dead_letters() == [(encode(numbered_events(3)[1]), "undecodable: test")]
    source = backend.source()
    assert source.recover(10) == []
    source.close()


def test_a_released_delivery_is_not_counted(backend: Backend) -> None:
    open_event_log(backend.settings, backend.root).append(numbered_events(2))
    source = backend.source()
    source.release(source.read_new(10, None))  # e.g. the disk was full: not the entries' fault
    source.close()
    source = backend.source()
    assert [e.deliveries for e in source.recover(10)] == [1, 1]
    source.close()


def test_lag_counts_undelivered_and_pending_entries(backend: Backend) -> None:
    open_event_log(backend.settings, backend.root).append(numbered_events(10))
    source = backend.source()
    assert source.lag().total == 10
    got = source.read_new(4, None)
    lag = source.lag()
    assert (lag.undelivered, lag.pending) == (6, 4)
    source.ack(got)
    assert (source.lag().undelivered, source.lag().pending) == (6, 0)
    source.close()


def test_concurrent_appends_interleave_whole_records(backend: Backend) -> None:
    def write(start: int) -> None:
        log = open_event_log(backend.settings, backend.root)
        for k in range(20):
            log.append(numbered_events(10, start=start + 10 * k))

    threads = [threading.Thread(target=write, args=(1000 * t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    source = backend.source()
    got = source.read_new(10_000, None)
    ids = [json.loads(e.raw or b"")["event_id"] for e in got]
    assert sorted(ids) == sorted(f"e{1000 * t + i}" for t in range(4) for i in range(200))
    source.close()


def test_an_unreachable_log_names_where_it_is(backend: Backend, tmp_path: Path) -> None:
    if backend.kind == "redis":
        settings = replace(backend.settings, redis_url="redis://:hunter2@127.0.0.1:1/0")
        where = "redis://:***@127.0.0.1:1/0"
    else:
        (tmp_path / "blocked").write_text("a file where the spool folder should be")
        settings = replace(backend.settings, spool=Path("blocked") / "spool")
        where = str(tmp_path / "blocked" / "spool")
    with pytest.raises(EventLogUnavailableError, match=re.escape(where)) as caught:
        open_event_log(settings, tmp_path).ping()
    assert "hunter2" not in str(caught.value)
    with pytest.raises(EventLogUnavailableError):
        open_event_source(settings, tmp_path)


# -- Redis Streams ---------------------------------------------------------------------------------------


def test_the_environment_variable_selects_redis(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECFLOW_REDIS_URL", redis_server.url)
    log = open_event_log(EventLogSettings(stream=f"test:{uuid.uuid4().hex}"))
    assert log.where.startswith(redis_server.url)
    monkeypatch.delenv("RECFLOW_REDIS_URL")
    assert open_event_log(EventLogSettings()).where.startswith("spool ")


def test_trimming_drops_only_entries_every_group_acknowledged(redis_backend: Backend) -> None:
    backend = redis_backend
    assert backend.server is not None
    client = backend.server.client()
    settings = replace(backend.settings, maxlen=100)
    open_event_log(settings).append(numbered_events(1000))
    store = open_event_source(settings, consumer="c1")
    audit = open_event_source(replace(settings, group="audit"), consumer="a1")
    store.ack(store.read_new(800, None))
    assert client.xlen(settings.stream) == 1000  # group "audit" has read nothing: nothing may go
    seen = audit.read_new(300, None)
    audit.ack(seen[:250])  # audit: 250 acknowledged, 50 pending
    left = client.xlen(settings.stream)
    assert 700 <= left < 1000  # acknowledged by both groups: trimmed (whole radix-tree nodes, hence "~")

    def key(stream_id: str | bytes) -> tuple[int, int]:
        ms, seq = (stream_id.decode() if isinstance(stream_id, bytes) else stream_id).split("-")
        return int(ms), int(seq)

    [(oldest, _)] = client.xrange(settings.stream, count=1)
    assert key(oldest) <= key(seen[250].id)  # audit's oldest pending entry is still there
    audit.ack(seen[250:])
    audit.ack(audit.read_new(1000, None))
    [(oldest, _)] = client.xrange(settings.stream, count=1)
    assert key(oldest) <= key(store.read_new(1, None)[0].id)  # never past what "c1" has not read yet
    store.close()
    audit.close()


def test_a_dead_consumers_pending_entries_are_claimed_after_the_idle_time(redis_backend: Backend) -> None:
    backend = redis_backend
    open_event_log(backend.settings).append(numbered_events(3))
    dead = backend.source("dead")
    held = dead.read_new(10, None)
    alive = backend.source("alive")
    assert alive.recover(10) == []  # not idle long enough yet (claim_idle_ms=100)
    time.sleep(0.2)
    claimed = alive.recover(10)
    assert [e.id for e in claimed] == [e.id for e in held] and all(e.deliveries == 2 for e in claimed)
    alive.ack(claimed)
    assert alive.lag().pending == 0


def test_a_lost_consumer_group_is_created_again(redis_backend: Backend) -> None:
    backend = redis_backend
    assert backend.server is not None
    source = backend.source()
    backend.server.client().delete(backend.settings.stream)  # as after a restart of a Redis without persistence
    open_event_log(backend.settings).append(numbered_events(2))
    assert len(source.recover(10)) == 0
    assert len(source.read_new(10, None)) == 2
