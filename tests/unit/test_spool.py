"""What is particular to the local spool, the event log without Redis: torn lines heal, the file is emptied once
everything is acknowledged, one consumer at a time, an atomic position file. The contract both event logs keep is
in tests/integration/test_eventlog.py (it needs a redis-server)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from recflow.config import EventLogSettings
from recflow.errors import EventLogUnavailableError
from recflow.stream.log import EventSource, encode, open_event_log, open_event_source, redact

from ..factories import numbered_events


@pytest.fixture(autouse=True)
def _no_redis_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECFLOW_REDIS_URL", raising=False)


def spool_source(root: Path, consumer: str = "c1") -> EventSource:
    return open_event_source(EventLogSettings(), root, consumer=consumer)


def test_redact_hides_only_the_password() -> None:
    assert redact("redis://user:pw@host:6380/1") == "redis://user:***@host:6380/1"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"


def test_the_spool_heals_a_line_torn_by_a_dead_writer(tmp_path: Path) -> None:
    log = open_event_log(EventLogSettings(), tmp_path)
    log.append(numbered_events(1))
    with (tmp_path / "spool" / "events.jsonl").open("ab") as out:
        out.write(b'{"user_id":"u9","ite')  # the writer died here
    source = spool_source(tmp_path)
    assert len(source.read_new(10, None)) == 1  # the torn line is not offered while incomplete
    log.append(numbered_events(1, start=1))
    got = source.read_new(10, None)
    assert [e.raw for e in got] == [b'{"user_id":"u9","ite', encode(numbered_events(1, start=1)[0])]


def test_the_spool_is_emptied_once_everything_is_acknowledged_and_keeps_working(tmp_path: Path) -> None:
    log = open_event_log(EventLogSettings(), tmp_path)
    log.append(numbered_events(5))
    source = spool_source(tmp_path)
    got = source.read_new(10, None)
    source.ack(got[:4])
    assert (tmp_path / "spool" / "events.jsonl").stat().st_size > 0
    source.ack(got[4:])
    assert (tmp_path / "spool" / "events.jsonl").stat().st_size == 0
    log.append(numbered_events(2, start=5))
    assert [json.loads(e.raw or b"")["event_id"] for e in source.read_new(10, None)] == ["e5", "e6"]
    source.close()


def test_the_spool_takes_one_consumer_at_a_time(tmp_path: Path) -> None:
    first = spool_source(tmp_path)
    with pytest.raises(EventLogUnavailableError, match="another consumer"):
        spool_source(tmp_path)
    first.close()
    spool_source(tmp_path).close()


def test_the_spool_position_is_written_atomically(tmp_path: Path) -> None:
    open_event_log(EventLogSettings(), tmp_path).append(numbered_events(3))
    source = spool_source(tmp_path)
    source.ack(source.read_new(2, None))
    source.close()
    position = json.loads((tmp_path / "spool" / "position.json").read_text())
    assert position["offset"] == len(encode(numbered_events(1)[0])) + len(encode(numbered_events(2)[1])) + 2
    assert not [p for p in os.listdir(tmp_path / "spool") if p.endswith(".tmp")]
