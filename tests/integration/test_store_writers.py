"""Every writer of the store at once, and faults of the environment, with real `recflow` processes (issue 12).

- `recflow consume` beside `recflow ingest`, and two ingests, of overlapping events, at the same time and
  repeatedly: the store holds each distinct event once (it held 110,120 rows for 100,000 events before the
  store took its own lock).
- A corrupt file in a partition (Redis and the spool), a read-only store folder, a full disk (a small tmpfs),
  a Redis killed under the consumer: nothing dead-lettered, nothing acknowledged, a clear message, a non-zero
  exit; once the fault is fixed everything is stored once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from recflow.store.eventstore import scan_store

from ..conftest import write_small_project
from ..factories import numbered_events
from ..redis_server import RedisServer

RECFLOW = str(Path(sys.executable).parent / "recflow")
STREAM, DEAD, GROUP = "events", "events:dead", "store"


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RECFLOW_REDIS_URL"}
    return env | {"OPENBLAS_NUM_THREADS": "1", "COLUMNS": "250"}


def start(root: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [RECFLOW, *args], cwd=root, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RECFLOW, *args], cwd=root, env=environment(), capture_output=True, text=True, timeout=300)


def records(start_at: int, stop: int, *, given_ids: bool) -> list[dict[str, object]]:
    """Events `start_at` to `stop - 1`, with their own event_id `e<i>` or none (derived from the fields)."""
    found = numbered_events(stop - start_at, start_at, users=997, items=89, per_second=10)
    return found if given_ids else [{k: v for k, v in r.items() if k != "event_id"} for r in found]


def write_files(folder: Path, events: list[dict[str, object]], parts: int) -> Path:
    """`events` as `parts` JSON Lines files in `folder`: each a batch of its own, so commits interleave."""
    folder.mkdir(parents=True)
    size = -(-len(events) // parts)
    for n in range(parts):
        chunk = events[n * size : (n + 1) * size]
        (folder / f"part{n}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in chunk))
    return folder


def stored(root: Path) -> list[tuple[object, ...]]:
    table = scan_store(root / "data/events", columns=["user_id", "item_id", "timestamp", "event_id"])
    return list(zip(*(table[c].to_pylist() for c in table.column_names), strict=True))


def finish(processes: list[subprocess.Popen[str]]) -> list[tuple[int, str, str]]:
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        results.append((process.returncode, out, err))
    return results


def dead_letters(root: Path) -> list[str]:
    path = root / "spool" / "dead-letter.jsonl"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("given_ids", [False, True], ids=["derived-ids", "given-ids"])
def test_consume_and_ingests_at_once_store_each_event_once(tmp_path: Path, given_ids: bool) -> None:
    write_small_project(tmp_path, eventlog={"batch_size": 1000})
    n = 20_000
    for round_ in range(2):  # every combination at once, twice
        base = round_ * 2 * n
        (tmp_path / f"spooled{round_}.jsonl").write_text(
            "".join(json.dumps(e) + "\n" for e in records(base, base + n, given_ids=given_ids))
        )
        assert run(tmp_path, "publish", f"spooled{round_}.jsonl").returncode == 0
        first = write_files(tmp_path / f"a{round_}", records(base + n // 2, base + 3 * n // 2, given_ids=given_ids), 5)
        second = write_files(tmp_path / f"b{round_}", records(base, base + n, given_ids=given_ids), 5)
        processes = [
            start(tmp_path, "consume"),
            start(tmp_path, "ingest", str(first)),
            start(tmp_path, "ingest", str(second)),
        ]
        results = finish(processes)
        assert [code for code, _, _ in results] == [0, 0, 0], results
        rows = stored(tmp_path)
        assert len(rows) == len(set(rows)) == (round_ + 1) * 3 * n // 2  # rows == distinct events
        ids = Counter(row[3] for row in rows)
        assert ids.most_common(1)[0][1] == 1
    assert dead_letters(tmp_path) == []


def corrupt_partition_file(root: Path, day: str) -> Path:
    path = root / "data" / "events" / f"date={day}" / "part-0123456789abcdef0123456789abcdef.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PAR1 not a parquet file")
    return path


@pytest.mark.parametrize("backend", ["redis", "spool"])
def test_a_corrupt_store_file_stops_consume_and_dead_letters_nothing(tmp_path: Path, backend: str) -> None:
    """Regression (issue 12): `recflow consume` exited 0 and dead-lettered all 1,000 new events."""
    server = RedisServer(tmp_path / "redis").start() if backend == "redis" else None
    try:
        eventlog = {"stream": STREAM, "dead_letter_stream": DEAD, "group": GROUP, "consumer": "worker"}
        write_small_project(tmp_path, eventlog=eventlog | ({"redis_url": server.url} if server else {}))
        (tmp_path / "new.jsonl").write_text("".join(json.dumps(e) + "\n" for e in records(0, 1000, given_ids=False)))
        assert run(tmp_path, "publish", "new.jsonl").returncode == 0
        bad = corrupt_partition_file(tmp_path, "2023-11-14")  # the events' first date
        named = str(bad.relative_to(tmp_path))  # as params.yaml names the store
        for _ in range(3):
            result = run(tmp_path, "consume")
            assert result.returncode != 0, result.stdout
            message = " ".join(result.stderr.split())
            assert named in message and "nothing was dead-lettered or acknowledged" in message, message
        if server is not None:
            client = server.client()
            assert client.xlen(DEAD) == 0 and client.xpending(STREAM, GROUP)["pending"] == 1000
        assert dead_letters(tmp_path) == []
        check = run(tmp_path, "store", "check")
        assert check.returncode == 1 and named in check.stdout.replace("\n", "").replace(" ", ""), check.stdout
        bad.unlink()
        result = run(tmp_path, "consume")
        assert result.returncode == 0, result.stderr
        assert len(stored(tmp_path)) == len(set(stored(tmp_path))) == 1000
        assert run(tmp_path, "store", "check").returncode == 0
        if server is not None:
            assert server.client().xpending(STREAM, GROUP)["pending"] == 0
    finally:
        if server is not None:
            server.stop()


@contextmanager
def immutable(folder: Path) -> Iterator[None]:
    """A folder nobody can change, root included (chattr +i), for the duration."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)], check=False).returncode:
        pytest.skip("running as root without chattr +i: a read-only folder cannot be made here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_a_read_only_store_stops_consume_and_keeps_the_entries(tmp_path: Path) -> None:
    write_small_project(tmp_path)
    (tmp_path / "old.jsonl").write_text("".join(json.dumps(e) + "\n" for e in records(0, 10, given_ids=False)))
    assert run(tmp_path, "ingest", "old.jsonl").returncode == 0  # the store folder exists
    (tmp_path / "new.jsonl").write_text(
        "".join(json.dumps(e) + "\n" for e in records(2_000_000, 2_001_000, given_ids=False))  # a new date
    )
    assert run(tmp_path, "publish", "new.jsonl").returncode == 0
    with immutable(tmp_path / "data" / "events"):
        result = run(tmp_path, "consume")
    assert result.returncode != 0
    assert "permission denied" in " ".join(result.stderr.split()), result.stderr
    assert dead_letters(tmp_path) == []
    assert run(tmp_path, "consume").returncode == 0
    assert len(stored(tmp_path)) == len(set(stored(tmp_path))) == 1010


@contextmanager
def small_disk(folder: Path, size: str) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the unit tests inject ENOSPC")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_stops_consume_and_keeps_the_entries(tmp_path: Path) -> None:
    write_small_project(tmp_path)
    (tmp_path / "new.jsonl").write_text("".join(json.dumps(e) + "\n" for e in records(0, 5000, given_ids=False)))
    assert run(tmp_path, "publish", "new.jsonl").returncode == 0
    with small_disk(tmp_path / "data", "256k"):
        filler = tmp_path / "data" / "filler"
        with filler.open("wb") as out, pytest.raises(OSError):
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        result = run(tmp_path, "consume")
        assert result.returncode != 0
        assert "the disk is full" in " ".join(result.stderr.split()), result.stderr
        assert dead_letters(tmp_path) == []
        filler.unlink()
        result = run(tmp_path, "consume")
        assert result.returncode == 0, result.stderr
        assert len(stored(tmp_path)) == len(set(stored(tmp_path))) == 5000


def test_a_redis_killed_under_consume_stops_it_and_loses_nothing(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        eventlog = {"redis_url": server.url, "stream": STREAM, "dead_letter_stream": DEAD, "group": GROUP}
        write_small_project(tmp_path, eventlog=eventlog | {"consumer": "worker", "batch_size": 500})
        total = 60_000
        (tmp_path / "new.jsonl").write_text("".join(json.dumps(e) + "\n" for e in records(0, total, given_ids=True)))
        assert run(tmp_path, "publish", "new.jsonl").returncode == 0
        consumer = start(tmp_path, "consume")
        deadline = time.monotonic() + 60
        while not list((tmp_path / "data" / "events").glob("date=*/part-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(server.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
        server.process.wait()  # type: ignore[union-attr]
        _, err = consumer.communicate(timeout=120)
        assert consumer.returncode == 2, err
        assert "is unreachable" in " ".join(err.split())
        server.start()
        client = server.client()
        assert client.xlen(DEAD) == 0
        result = run(tmp_path, "consume")
        assert result.returncode == 0, result.stderr
        ids = [row[3] for row in stored(tmp_path)]
        assert len(ids) == len(set(ids)) == total
        assert client.xlen(DEAD) == 0 and client.xpending(STREAM, GROUP)["pending"] == 0
    finally:
        server.stop()
