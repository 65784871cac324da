"""The Redis Streams path: throughput publish -> store, and how soon a published event is visible in the store.

Against a real Redis (default redis://127.0.0.1:6379/0; streams named bench:<uuid>, deleted afterwards) and
a temporary project folder:

  (a) publish: `EventLog.append` of N events (XADD from a Lua script, 2,000 per call, calls pipelined)
  (b) drain a backlog: `consumer.drain` of those N events into an empty store (XREADGROUP COUNT batch_size,
      one ingest per batch, XACK + trim after each)
  (c) publish -> store at once: a real `recflow consume --follow` process while this process publishes N new
      events as fast as it can; from the first append until the last event is in the store
  (d) freshness: `recflow consume --follow` while this process publishes at a steady rate (default 1k
      events/s, 10 events every 10 ms); an event counts as visible when the store file holding it is in
      place (the store is polled every 10 ms); latency = visible - the moment its append began

CPU s: CPU seconds (user + system, all threads) of the publishing (a), draining (b) or consuming (c) process
during the case; Redis CPU s: the server's. Other jobs on the machine stretch the wall clock, not these.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_stream.py --events 300000 --rate 1000 --seconds 20
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import redis
import yaml
from _common import machine, print_table

from recflow.config import Settings, load_settings
from recflow.stream.consumer import drain
from recflow.stream.log import open_event_log, redact

RECFLOW = str(Path(sys.executable).parent / "recflow")


def events(n: int, start: int = 0) -> list[dict[str, object]]:
    return [
        {
            "user_id": f"u{i % 50_000}",
            "item_id": f"i{i % 5_000}",
            "action": "view",
            "timestamp": 1_790_000_000 + i // 100,
        }
        | {"event_id": f"e{i}"}
        for i in range(start, start + n)
    ]


class StoreWatcher:
    """When each event id first appears in the store: reads the event_id column of every new store file."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.seen: set[Path] = set()
        self.visible: dict[str, float] = {}

    def poll(self) -> int:
        now = time.perf_counter()
        for path in sorted(self.store.glob("date=*/part-*.parquet")):
            if path not in self.seen:
                self.seen.add(path)
                for event_id in pq.read_table(path, columns=["event_id"])["event_id"].to_pylist():
                    self.visible.setdefault(event_id, now)
        return len(self.visible)


def own_cpu() -> float:
    """CPU seconds of this process so far, all threads (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    """CPU seconds of another process so far (Linux /proc), all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu(client: redis.Redis) -> float:
    """CPU seconds the Redis server has used so far (INFO cpu; it also counts other clients' commands)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def project(root: Path, url: str, tag: str, **eventlog: object) -> Settings:
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["eventlog"] |= {"redis_url": url, "stream": f"bench:{tag}", "dead_letter_stream": f"bench:{tag}:dead"}
    params["eventlog"] |= {"consumer": "bench"} | eventlog
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return load_settings(root / "params.yaml")


def follow(root: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "RECFLOW_REDIS_URL"} | {"OPENBLAS_NUM_THREADS": "1"}
    log = (root / "consumer.log").open("ab")
    process = subprocess.Popen([RECFLOW, "consume", "--follow"], cwd=root, env=env, stdout=log, stderr=log)
    log.close()
    return process


def wait_for(watcher: StoreWatcher, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while watcher.poll() < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(watcher.visible):,} of {count:,} events reached the store in {timeout} s")
        time.sleep(0.01)


def run(url: str, n: int, rate: int, seconds: float, work: Path) -> None:
    client = redis.Redis.from_url(url)
    tags = [uuid.uuid4().hex[:8] for _ in range(3)]
    rows: list[list[object]] = []
    try:
        # (a) + (b): a backlog, published then drained in this process
        root = work / "backlog"
        root.mkdir()
        settings = project(root, url, tags[0])
        log = open_event_log(settings.eventlog, root)
        batch = events(n)
        start, cpu, server = time.perf_counter(), own_cpu(), server_cpu(client)
        for chunk in range(0, n, 10_000):
            log.append(batch[chunk : chunk + 10_000])
        publish, publish_cpu, server = time.perf_counter() - start, own_cpu() - cpu, server_cpu(client) - server
        rows.append(["(a) publish", f"{n:,}", publish, f"{n / publish:,.0f}", publish_cpu, server, ""])
        start, cpu, server = time.perf_counter(), own_cpu(), server_cpu(client)
        report = drain(settings, root=root)
        seconds_drain, cpu, server = time.perf_counter() - start, own_cpu() - cpu, server_cpu(client) - server
        note = f"{report.batches} batches"
        rows.append(["(b) drain a backlog", f"{n:,}", seconds_drain, f"{n / seconds_drain:,.0f}", cpu, server, note])

        # (c): publisher here, `recflow consume --follow` in its own process
        root = work / "concurrent"
        root.mkdir()
        settings = project(root, url, tags[1])
        consumer = follow(root)
        try:
            open_event_log(settings.eventlog, root).ping()
            time.sleep(3.0)  # let the consumer start (imports) before the clock runs
            watcher = StoreWatcher(root / settings.paths.store)
            log = open_event_log(settings.eventlog, root)
            start, consumer_cpu, server = time.perf_counter(), process_cpu(consumer.pid), server_cpu(client)
            for chunk in range(0, n, 10_000):
                log.append(batch[chunk : chunk + 10_000])
            published = time.perf_counter() - start
            wait_for(watcher, n, timeout=600)
            total, consumer_cpu = max(watcher.visible.values()) - start, process_cpu(consumer.pid) - consumer_cpu
            consumer_server = server_cpu(client) - server
        finally:
            consumer.send_signal(signal.SIGTERM)
            consumer.wait(timeout=60)
        note = f"publish {published:.1f} s"
        rows.append(["(c) publish -> store", f"{n:,}", total, f"{n / total:,.0f}", consumer_cpu, consumer_server, note])

        # (d): steady rate, latency to the store
        root = work / "freshness"
        root.mkdir()
        settings = project(root, url, tags[2])
        consumer = follow(root)
        try:
            time.sleep(3.0)
            watcher = StoreWatcher(root / settings.paths.store)
            log = open_event_log(settings.eventlog, root)
            sent: dict[str, float] = {}
            per_tick, tick = max(rate // 100, 1), 0.01
            total_events = int(rate * seconds)
            stop = threading.Event()

            def poll() -> None:
                while not stop.is_set():
                    watcher.poll()
                    time.sleep(0.01)

            poller = threading.Thread(target=poll)
            poller.start()
            begin = time.perf_counter()
            for k, chunk in enumerate(range(0, total_events, per_tick)):
                time.sleep(max(0.0, begin + k * tick - time.perf_counter()))
                records = events(per_tick, start=chunk)
                moment = time.perf_counter()
                log.append(records)
                sent.update((str(r["event_id"]), moment) for r in records)
            achieved = len(sent) / (time.perf_counter() - begin)
            deadline = time.monotonic() + 30
            while len(watcher.visible) < len(sent) and time.monotonic() < deadline:
                time.sleep(0.05)
            stop.set()
            poller.join()
        finally:
            consumer.send_signal(signal.SIGTERM)
            consumer.wait(timeout=60)
        latency = np.array([watcher.visible[i] - t for i, t in sent.items() if i in watcher.visible])
        lost = len(sent) - len(latency)
        p50, p99, worst = (float(np.percentile(latency, q)) for q in (50, 99, 100))
        case = f"(d) in the store, at {achieved:,.0f}/s"
        freshness = [[case, f"{len(sent):,}", p50, p99, worst, lost]]
    finally:
        for tag in tags:
            client.delete(f"bench:{tag}", f"bench:{tag}:dead")
    print(f"machine: {machine()}; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"redis {client.info('server')['redis_version']} at {url}; {settings.eventlog.batch_size:,} entries per batch"
    )
    print_table("throughput", ["case", "events", "seconds", "events/s", "CPU s", "Redis CPU s", "note"], rows)
    print_table("freshness", ["case", "events", "p50 s", "p99 s", "max s", "not seen"], freshness)
    per_event = (publish_cpu + consumer_cpu + consumer_server) / n
    print(f"CPU per event from publish to store: {per_event * 1e6:.1f} us = publisher {publish_cpu / n * 1e6:.1f} "
          f"(a) + consumer {consumer_cpu / n * 1e6:.1f} + Redis {consumer_server / n * 1e6:.1f} (c); one core "
          f"fully given to the path would carry {1 / per_event:,.0f} events/s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=os.environ.get("RECFLOW_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--events", type=int, default=300_000, help="events for the throughput cases")
    parser.add_argument("--rate", type=int, default=1000, help="events per second for the freshness case")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the freshness case publishes")
    args = parser.parse_args()
    try:
        redis.Redis.from_url(args.redis_url, socket_connect_timeout=2).ping()
    except redis.ConnectionError as exc:
        print(f"skipped: no Redis at {redact(args.redis_url)} ({exc}); start one or pass --redis-url")
        return
    work = Path(tempfile.mkdtemp(prefix="recflow-bench-stream-"))
    try:
        run(args.redis_url, args.events, args.rate, args.seconds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
