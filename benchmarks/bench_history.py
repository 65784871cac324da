"""Ingest cost against history: 1M new events into a store that already holds many, beside the same 1M into an
empty store, in the same run (issue 12: costs bounded by the new data, not the history).

Builds a store of --history events spread over --days days (through `ingest_table`, in chunks), then times, as the
median of --repeats runs (the files a run adds are removed before the next):

  (e) ingest_files of a Parquet file of --events new events into an empty store
  (h) the same file into the store holding the history
  (x) the same events with their own event_id (which can collide anywhere: every stored file is checked)

The new events have no event_id (ids derived from their fields, the usual case) and span the history's last day
and the two days after it, so dedup reads the last day's partition too.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_history.py --history 50000000 --events 1000000
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recflow.config import EventSettings
from recflow.store.eventstore import EXPLICIT_ID_FILES, IngestReport, ingest_files, ingest_table
from recflow.store.health import data_files

START = datetime(2024, 1, 1, tzinfo=UTC)
DAY_MS = 86_400_000
CHUNK = 2_000_000  # history events per ingest_table call
SETTINGS = EventSettings()


def events(n: int, first_ms: int, last_ms: int, seed: int, *, with_ids: bool = False) -> pa.Table:
    """`n` events between two moments (sorted by time), over 1M users and 100k items."""
    rng = np.random.default_rng(seed)

    def ids(prefix: str, count: int) -> pa.Array:
        return pc.binary_join_element_wise(prefix, pc.cast(pa.array(rng.integers(0, count, n)), pa.string()), "")

    columns = {
        "user_id": ids("u", 1_000_000),
        "item_id": ids("i", 100_000),
        "action": pa.array(
            np.array(["view", "click", "add_to_cart", "purchase"])[rng.choice(4, n, p=[0.6, 0.25, 0.1, 0.05])]
        ),
        "timestamp": pa.array(np.sort(rng.integers(first_ms, last_ms, n)), pa.timestamp("ms", tz="UTC")),
    }
    if with_ids:
        columns["event_id"] = pc.binary_join_element_wise(
            "x", pc.cast(pa.array(np.arange(n) + seed * n), pa.string()), ""
        )
    return pa.table(columns)


def build_history(store: Path, rejected: Path, total: int, days: int) -> float:
    """Fill `store` with `total` events over `days` days; returns the seconds it took."""
    start_ms = int(START.timestamp() * 1000)
    began = time.perf_counter()
    chunks = -(-total // CHUNK)
    for k in range(chunks):
        n = min(CHUNK, total - k * CHUNK)
        first = start_ms + k * days * DAY_MS // chunks
        last = start_ms + (k + 1) * days * DAY_MS // chunks
        ingest_table(events(n, first, last, seed=k), source=f"history {k}", store=store, rejected=rejected,
                     settings=SETTINGS, now=datetime.now(UTC))  # fmt: skip
        print(f"  history: {min((k + 1) * CHUNK, total):,} / {total:,} events, {time.perf_counter() - began:.0f} s",
              flush=True)  # fmt: skip
    return time.perf_counter() - began


def timed(run: Callable[[], IngestReport], undo: Callable[[], None], repeats: int) -> tuple[float, IngestReport]:
    seconds, report = [], IngestReport()
    for _ in range(repeats):
        undo()
        began = time.perf_counter()
        report = run()
        seconds.append(time.perf_counter() - began)
    undo()
    return statistics.median(seconds), report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=50_000_000, help="events already stored (default 50M)")
    parser.add_argument("--events", type=int, default=1_000_000, help="new events to ingest (default 1M)")
    parser.add_argument("--days", type=int, default=365, help="days the history spans")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the stores (default /tmp)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recflow-bench-history-", dir=args.workdir))
    try:
        run(work, args.history, args.events, args.days, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, history: int, new: int, days: int, repeats: int) -> None:
    big, empty, rejected = work / "big", work / "empty", work / "rejected"
    print(f"building a store of {history:,} events over {days} days", flush=True)
    build_seconds = build_history(big, rejected, history, days)
    end_ms = int(START.timestamp() * 1000) + days * DAY_MS
    derived_file, given_file = work / "new.parquet", work / "new-with-ids.parquet"
    pq.write_table(events(new, end_ms - DAY_MS, end_ms + 2 * DAY_MS, seed=10_000), derived_file)
    pq.write_table(events(new, end_ms - DAY_MS, end_ms + 2 * DAY_MS, seed=10_000, with_ids=True), given_file)
    before = set(data_files(big))
    listing = (big / EXPLICIT_ID_FILES).read_bytes()

    def undo_big() -> None:
        for path in set(data_files(big)) - before:
            path.unlink()
        (big / EXPLICIT_ID_FILES).write_bytes(listing)

    def undo_empty() -> None:
        shutil.rmtree(empty, ignore_errors=True)

    def ingest(path: Path, store: Path) -> Callable[[], IngestReport]:
        return lambda: ingest_files([path], store=store, rejected=rejected, settings=SETTINGS, now=datetime.now(UTC))

    cases = [
        ("(e) 1 file, empty store", timed(ingest(derived_file, empty), undo_empty, repeats)),
        (f"(h) 1 file, store of {history:,}", timed(ingest(derived_file, big), undo_big, repeats)),
        (f"(x) same with own ids, store of {history:,}", timed(ingest(given_file, big), undo_big, repeats)),
    ]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    size = sum(f.stat().st_size for f in data_files(big)) / 1e9
    print(f"\nmachine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, python "
          f"{platform.python_version()}, pyarrow {pa.__version__}, duckdb {duckdb.__version__}; load average after "
          f"the runs {load} (other processes share the cores)")  # fmt: skip
    print(f"history: {history:,} events in {len(before):,} files ({size:.2f} GB), built in {build_seconds:.0f} s "
          f"({history / build_seconds:,.0f} events/s); new: {new:,} events; median of {repeats} runs\n")  # fmt: skip
    print(f"{'case':<44} {'median s':>9} {'events/s':>11}  stored / duplicate")
    for name, (seconds, report) in cases:
        print(f"{name:<44} {seconds:>9.2f} {new / seconds:>11,.0f}  {report.stored:,} / {report.duplicate:,}")
    ratio = cases[1][1][0] / cases[0][1][0]
    print(f"\nratio (h) / (e): {ratio:.2f} (1.00: the history costs nothing)")


if __name__ == "__main__":
    main()
