"""The event log end to end, with real redis-servers (private, on free ports, append-only file fsync'd
always) and real `recflow consume` processes: killed with SIGKILL at random points (Redis and the local
spool), Redis itself killed and restarted under a running consumer, two consumers sharing one store, poison
entries among good ones. At the end every published event is in the store exactly once."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml

from recflow.config import load_settings
from recflow.errors import EventLogUnavailableError
from recflow.store.eventstore import scan_store
from recflow.stream.log import open_event_log, open_event_source

from ..conftest import write_small_project
from ..factories import numbered_events
from ..redis_server import RedisServer

RECFLOW = str(Path(sys.executable).parent / "recflow")
STREAM, DEAD, GROUP, CONSUMER = "events", "events:dead", "store", "worker"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def project(root: Path, server: RedisServer, **eventlog: object) -> Path:
    conf = {"redis_url": server.url, "stream": STREAM, "dead_letter_stream": DEAD, "group": GROUP}
    write_small_project(root, eventlog={**conf, "consumer": CONSUMER, **eventlog})
    return root


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RECFLOW_REDIS_URL"}
    return env | {"OPENBLAS_NUM_THREADS": "1", "COLUMNS": "250"}


def start_consumer(root: Path, *args: str, log_name: str = "consumer.log") -> subprocess.Popen[bytes]:
    """`recflow consume ARGS` in the background, its output appended to `root/log_name`."""
    with (root / log_name).open("ab") as log:
        return subprocess.Popen([RECFLOW, "consume", *args], cwd=root, env=environment(), stdout=log, stderr=log)


def run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RECFLOW, *args], cwd=root, env=environment(), capture_output=True, text=True, timeout=300)


def events(n: int, start: int = 0) -> list[dict[str, object]]:
    """Spread over many users and items, ten to a second, like a busy shop."""
    return numbered_events(n, start, users=997, items=89, per_second=10)


def stored_ids(root: Path) -> list[str]:
    return scan_store(root / "data/events", columns=["event_id"])["event_id"].to_pylist()


def wait_until_stored(root: Path, count: int, seconds: float = 60) -> None:
    """Until the store holds `count` events or the time is up (the assertions after it say what is missing)."""
    deadline = time.monotonic() + seconds
    while len(stored_ids(root)) < count and time.monotonic() < deadline:
        time.sleep(0.2)


def assert_stored_exactly_once(root: Path, published: int) -> None:
    ids = stored_ids(root)
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    assert not repeated, f"stored more than once: {repeated[:5]}"
    missing = {f"e{i}" for i in range(published)} - set(ids)
    assert not missing, f"{len(missing)} published events were never stored, e.g. {sorted(missing)[:5]}"
    assert len(ids) == published


def publish_paced(root: Path, total: int, chunk: int, seconds: float, done: threading.Event) -> threading.Thread:
    """Publish `total` events in chunks spread over `seconds`, retrying a chunk while Redis is down."""
    log = open_event_log(load_settings(root / "params.yaml").eventlog, root)

    def work() -> None:
        for start in range(0, total, chunk):
            while True:
                try:
                    log.append(events(min(chunk, total - start), start))
                    break
                except EventLogUnavailableError:  # Redis restarting: retry (a repeat is a duplicate, stored once)
                    time.sleep(0.2)
            time.sleep(seconds * chunk / total)
        done.set()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_kill_9_at_random_points_loses_and_duplicates_nothing(tmp_path: Path, server: RedisServer) -> None:
    total, kills = 100_000, 22
    # Killing the consumer on purpose, again and again, is what the crash rule (max_deliveries, tested in the
    # poison test) guards against: a batch in hand at five kills in a row would rightly count as a killer.
    # Here the rule is out of the way: this test is about the store holding every event exactly once.
    root = project(tmp_path, server, batch_size=2000, block_ms=200, linger_ms=100, max_deliveries=1000)
    client = server.client()
    published = threading.Event()
    publisher = publish_paced(root, total, chunk=1000, seconds=35.0, done=published)
    rng = random.Random(5)
    mid_batch = 0
    for kill in range(kills):
        consumer = start_consumer(root, "--follow")
        if kill % 2:  # any moment, start-up included
            time.sleep(rng.uniform(0.2, 2.5))
        else:  # once it is storing: wait for progress, then a little more
            read_before = _entries_read(client)
            deadline = time.monotonic() + 15
            while _entries_read(client) == read_before and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.4))
        consumer.send_signal(signal.SIGKILL)
        consumer.wait(timeout=10)
        assert consumer.returncode == -signal.SIGKILL, (root / "consumer.log").read_text()
        mid_batch += _pending(client) > 0
    assert published.wait(timeout=120)
    publisher.join()
    final = run(root, "consume")
    assert final.returncode == 0, final.stderr
    assert_stored_exactly_once(root, total)
    assert client.xpending(STREAM, GROUP)["pending"] == 0
    assert client.xlen(DEAD) == 0
    assert mid_batch >= 5, f"only {mid_batch} of {kills} kills caught the consumer holding a batch"


def test_kill_9_with_the_local_spool_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    total, kills = 60_000, 10
    conf = {"batch_size": 300, "block_ms": 200, "linger_ms": 0, "max_deliveries": 1000}  # see the test above
    write_small_project(tmp_path, eventlog=conf)
    log = open_event_log(load_settings(tmp_path / "params.yaml").eventlog, tmp_path)
    for start in range(0, total, 5000):  # a backlog: the consumer is busy whenever it runs
        log.append(events(5000, start))
    position = tmp_path / "spool" / "position.json"

    def state() -> dict[str, int]:
        return json.loads(position.read_text()) if position.exists() else {"offset": 0, "end": 0, "deliveries": 0}

    rng = random.Random(7)
    mid_batch = 0
    for _ in range(kills):
        consumer = start_consumer(tmp_path, "--follow")
        before, deadline = state(), time.monotonic() + 15
        while state() == before and time.monotonic() < deadline:  # started: it has read or acknowledged
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        consumer.send_signal(signal.SIGKILL)
        consumer.wait(timeout=10)
        mid_batch += state()["end"] > state()["offset"]  # killed holding delivered, unacknowledged lines
    final = run(tmp_path, "consume")
    assert final.returncode == 0, final.stderr
    assert_stored_exactly_once(tmp_path, total)
    assert not (tmp_path / "spool" / "dead-letter.jsonl").exists()
    assert mid_batch >= 3, f"only {mid_batch} of {kills} kills caught the consumer holding a batch"


def _pending(client: redis.Redis) -> int:
    try:
        return int(client.xpending(STREAM, GROUP)["pending"])
    except redis.ResponseError:  # killed before it created the group
        return 0


def _entries_read(client: redis.Redis) -> int:
    try:
        [group] = client.xinfo_groups(STREAM)
    except (redis.ResponseError, ValueError):
        return 0
    return int(group["entries-read"] or 0)


def test_the_consumer_reconnects_after_redis_restarts_and_loses_nothing(tmp_path: Path, server: RedisServer) -> None:
    total = 20_000
    root = project(tmp_path, server, batch_size=1000, block_ms=200, linger_ms=50)
    consumer = start_consumer(root, "--follow")
    published = threading.Event()
    publisher = publish_paced(root, total, chunk=500, seconds=8.0, done=published)
    try:
        # wait until it runs: a Redis that is down when the consumer starts is an error, not an outage
        client, deadline = server.client(), time.monotonic() + 30
        while _entries_read(client) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(2):
            time.sleep(2.0)
            os.kill(server.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
            server.process.wait()  # type: ignore[union-attr]
            time.sleep(1.0)  # the consumer's reads fail meanwhile
            server.start()
        assert published.wait(timeout=60)
        publisher.join()
        wait_until_stored(root, total)
    finally:
        consumer.send_signal(signal.SIGTERM)  # a graceful stop: finishes the batch in hand
        consumer.wait(timeout=30)
    output = (root / "consumer.log").read_text()
    assert consumer.returncode == 0, output
    assert "is unreachable" in output and "retrying" in output  # it did see Redis go away
    assert_stored_exactly_once(root, total)
    assert server.client().xpending(STREAM, GROUP)["pending"] == 0


def test_poison_entries_go_to_the_dead_letter_stream_with_their_reasons(tmp_path: Path, server: RedisServer) -> None:
    root = project(tmp_path, server, max_deliveries=2)
    client = server.client()
    settings = load_settings(root / "params.yaml")
    log = open_event_log(settings.eventlog)
    log.append(events(100))
    client.xadd(STREAM, {"payload": "{}"})  # no event field: poison
    client.xadd(STREAM, {"event": b"{'user_id':\n 1"})  # several lines, not JSON: poison
    log.append([{"user_id": "u\ud800", "item_id": "i", "action": "view", "timestamp": 1_700_000_000}])  # poison
    client.xadd(STREAM, {"event": b"{'user_id': 1"})  # not JSON: rejected (bad_json), as in a .jsonl file
    log.append([{"user_id": "u", "item_id": "i", "action": "clik", "timestamp": 1_700_000_000}])  # rejected
    client.xadd(STREAM, {"event": b'{"user_id": "u0",\n "item_id": "i0", "action": "view", "timestamp": 1}'})
    log.append(events(100, start=100))
    result = run(root, "consume")
    assert result.returncode == 0, result.stderr
    ids = stored_ids(root)
    assert len(ids) == len(set(ids)) == 201  # the 200 and the multi-line JSON record, made one line
    assert {f"e{i}" for i in range(200)} <= set(ids)
    reasons = [fields[b"reason"].decode() for _, fields in client.xrange(DEAD)]
    assert [r.split(":")[0] for r in reasons] == ["undecodable", "undecodable", "store failed"]
    assert "no 'event' field" in reasons[0] and "line breaks" in reasons[1] and "UnicodeEncodeError" in reasons[2]
    assert "dead-lettered" in result.stdout and f"stream {DEAD}" in result.stdout.replace("\n", "")
    assert "bad_json: 1" in result.stdout and "unknown_action: 1" in result.stdout

    # an entry whose consumers keep dying: delivered max_deliveries (2) times without an ack, then dead-lettered
    log.append(events(1, start=200))
    for _ in range(3):
        source = open_event_source(settings.eventlog, root)
        assert source.recover(10) or source.read_new(10, None)
        source.close()
    result = run(root, "consume")
    assert result.returncode == 0, result.stderr
    last = client.xrevrange(DEAD, count=1)[0][1]
    assert last[b"reason"].decode().startswith("crashed: delivered 4 times")
    assert client.xpending(STREAM, GROUP)["pending"] == 0


def test_publish_and_consume_through_the_cli(tmp_path: Path, server: RedisServer) -> None:
    root = project(tmp_path, server)
    (root / "events.jsonl").write_text(
        "\n".join(
            [
                '{"user_id": "u1", "item_id": "i1", "action": "view", "timestamp": "2024-05-01T12:00:00Z"}',
                "{broken",
                '{"user_id": "u2", "item_id": "i1", "action": "purchase", "timestamp": 1714564800}',
            ]
        )
        + "\n"
    )
    result = run(root, "publish", "events.jsonl")
    assert result.returncode == 0, result.stderr
    assert "published 2 events" in result.stdout and "1 records could not be read" in result.stdout
    assert server.client().xlen(STREAM) == 2
    rejected = root / "data/rejected"
    [refused] = [json.loads(line) for f in rejected.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert (refused["code"], refused["raw"], refused["record"]) == ("bad_json", "{broken", 2)  # kept, with its reason
    assert run(root, "publish", "events.jsonl").returncode == 0  # published again: refused again, logged once
    assert len(list(rejected.glob("*.jsonl"))) == 1 and server.client().xlen(STREAM) == 4
    result = run(root, "consume")
    assert result.returncode == 0, result.stderr
    assert len(stored_ids(root)) == 2


def test_an_unreachable_redis_is_one_clear_error_naming_the_url(tmp_path: Path, server: RedisServer) -> None:
    root = project(tmp_path, server)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["eventlog"]["redis_url"] = "redis://127.0.0.1:1/0"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for command in (["consume"], ["consume", "--follow"], ["publish", "params.yaml"]):
        result = run(root, *command)
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("error: Redis at redis://127.0.0.1:1/0 is unreachable"), line


def test_two_consumers_share_the_stream_and_the_store(tmp_path: Path, server: RedisServer) -> None:
    total = 30_000
    root = project(tmp_path, server, batch_size=1000, block_ms=200, linger_ms=50)
    names = ("one", "two")
    consumers = [start_consumer(root, "--follow", "--consumer", n, log_name=f"{n}.log") for n in names]
    published = threading.Event()
    publisher = publish_paced(root, total, chunk=500, seconds=4.0, done=published)
    try:
        assert published.wait(timeout=60)
        publisher.join()
        wait_until_stored(root, total)
    finally:
        for consumer in consumers:
            consumer.send_signal(signal.SIGTERM)
        for consumer in consumers:
            consumer.wait(timeout=30)
    logs = [(root / f"{n}.log").read_text() for n in names]
    assert [c.returncode for c in consumers] == [0, 0], logs
    assert_stored_exactly_once(root, total)  # the store lock serialises their writes: dedup stays exact
    read = [int(re.findall(r"│\s*([\d,]+) │", log)[0].replace(",", "")) for log in logs]  # first column: read
    assert min(read) > 0 and sum(read) >= total, read
