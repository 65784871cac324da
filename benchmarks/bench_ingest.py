"""Ingest speed: how many events per second go from a CSV file into the Parquet event store.

Generates a CSV of N events (about 5% invalid rows of every kind, 1% replayed duplicates) in a temporary
folder, then times, as the median of --repeats runs:

  (a) baseline: pyarrow read_csv + write one Parquet file (no validation, no dedup, no partitions)
  (b) recflow ingest_files into an empty store (read, validate, derive ids, dedup, write partitions)
  (b') the same for a CSV without invalid rows (every event stored: the common case)
  (c) recflow ingest_files of the same file again into the filled store (every event a duplicate)
  (d) recflow ingest_files of a small batch of new events into the filled store (dedup reads the
      partitions of the batch's dates; benchmarks/bench_history.py measures a store of 50M)

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_ingest.py --events 2000000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
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
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from recflow.config import EventSettings
from recflow.store.eventstore import IngestReport, ingest_files

NOW = datetime(2025, 1, 1, tzinfo=UTC)
DAYS = 30
SMALL_BATCH = 10_000  # case (d): what one stream-drain batch costs against a store of N events


def make_csv(path: Path, events: int, seed: int = 0, invalid: float = 0.05) -> None:
    """Write `events` rows: ISO-8601 Z / +02:00 / epoch-second timestamps, `invalid` share bad, ~1% replays."""
    rng = np.random.default_rng(seed)
    n = events

    def ids(prefix: str, count: int) -> pa.Array:
        return pc.binary_join_element_wise(prefix, pc.cast(pa.array(rng.integers(0, count, n)), pa.string()), "")

    end_ms = int(NOW.timestamp() * 1000) - 3_600_000
    ms = np.sort(rng.integers(end_ms - DAYS * 86_400_000, end_ms, n))
    moments = pa.array(ms, pa.timestamp("ms", tz="UTC"))
    timestamps = np.array(pc.strftime(moments, format="%Y-%m-%dT%H:%M:%SZ").to_numpy(zero_copy_only=False))
    plus_two = rng.random(n) < 0.05
    local = pc.strftime(pc.add(moments, pa.scalar(7_200_000, pa.duration("ms"))), format="%Y-%m-%dT%H:%M:%S+02:00")
    timestamps[plus_two] = np.asarray(local.to_numpy(zero_copy_only=False))[plus_two]
    epoch = rng.random(n) < 0.05
    timestamps[epoch] = (ms[epoch] // 1000).astype(str)
    columns = {
        "user_id": np.asarray(ids("u", max(n // 20, 1)).to_numpy(zero_copy_only=False)),
        "item_id": np.asarray(ids("i", max(n // 100, 1)).to_numpy(zero_copy_only=False)),
        "action": np.array(["view", "click", "add_to_cart", "purchase"])[rng.choice(4, n, p=[0.6, 0.25, 0.1, 0.05])],
        "timestamp": timestamps,
        "value": np.where(rng.random(n) < 0.3, np.round(rng.random(n) * 5, 1).astype(str), ""),
    }
    bad = np.flatnonzero(rng.random(n) < invalid)
    kinds = rng.integers(0, 7, len(bad))
    for kind, (column, text) in enumerate(
        [
            ("action", "clik"),
            ("user_id", ""),
            ("timestamp", "2024-12-01T10:00:00"),
            ("timestamp", "yesterday"),
            ("timestamp", "2031-01-01T00:00:00Z"),
            ("value", "n/a"),
            ("item_id", "i" * 300),
        ]
    ):
        columns[column] = columns[column].astype(object)
        columns[column][bad[kinds == kind]] = text
    table = pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})
    replay = np.sort(rng.choice(n, n // 100, replace=False))
    table = pa.concat_tables([table, table.take(replay)])
    pcsv.write_csv(table, path, write_options=pcsv.WriteOptions(quoting_style="none"))


def timed(
    run: Callable[[], object], repeats: int, setup: Callable[[], None] | None = None
) -> tuple[float, float, object]:
    """Median wall seconds, median CPU seconds (user + system, all threads) and the last result."""
    seconds, cpu, result = [], [], None
    for _ in range(repeats):
        if setup is not None:
            setup()
        start, start_cpu = time.perf_counter(), _cpu()
        result = run()
        seconds.append(time.perf_counter() - start)
        cpu.append(_cpu() - start_cpu)
    return statistics.median(seconds), statistics.median(cpu), result


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2_000_000, help="rows before replays (default 2M)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the CSV and stores (default /tmp)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recflow-bench-", dir=args.workdir))
    try:
        run(work, args.events, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, events: int, repeats: int) -> None:
    csv_path = work / "events.csv"
    make_csv(csv_path, events)
    rows = pcsv.read_csv(csv_path).num_rows
    settings = EventSettings()
    store, rejected = work / "store", work / "rejected"

    def fresh() -> None:
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(rejected, ignore_errors=True)

    def ingest() -> IngestReport:
        return ingest_files([csv_path], store=store, rejected=rejected, settings=settings, now=NOW)

    small = [work / f"small-{i}.csv" for i in range(repeats)]
    for i, path in enumerate(small):
        make_csv(path, SMALL_BATCH, seed=100 + i)
    baseline = timed(lambda: pq.write_table(pcsv.read_csv(csv_path), work / "baseline.parquet"), repeats)
    clean_path = work / "clean.csv"
    make_csv(clean_path, events, invalid=0.0)
    clean = timed(
        lambda: ingest_files([clean_path], store=store, rejected=rejected, settings=settings, now=NOW),
        repeats,
        setup=fresh,
    )
    first = timed(ingest, repeats, setup=fresh)
    again = timed(ingest, repeats, setup=None)
    batches = iter(small)
    little = timed(
        lambda: ingest_files([next(batches)], store=store, rejected=rejected, settings=settings, now=NOW), repeats
    )  # each repeat stores a different small batch
    small_rows = pcsv.read_csv(small[0]).num_rows
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}, pyarrow {pa.__version__}, duckdb {duckdb.__version__}, "
          f"numpy {np.__version__}; load average after the runs {load} (other processes share the cores)")  # fmt: skip
    print(f"input: {csv_path.stat().st_size / 1e6:.0f} MB CSV, {rows:,} rows; median of {repeats} runs\n")
    print(f"{'case':<38} {'events':>10} {'median s':>9} {'events/s':>11} {'CPU s':>6}  stored / duplicate / rejected")
    for name, n, (seconds, cpu, report) in [
        ("(a) baseline read_csv + write_table", rows, baseline),
        ("(b) ingest_files, empty store", rows, first),
        ("(b') same, no invalid rows", rows, clean),
        ("(c) re-ingest, filled store", rows, again),
        ("(d) small new batch, filled store", small_rows, little),
    ]:
        counts = f"{report.stored:,} / {report.duplicate:,} / {report.rejected:,}" if report else ""
        print(f"{name:<38} {n:>10,} {seconds:>9.2f} {n / seconds:>11,.0f} {cpu:>6.2f}  {counts}")
    if isinstance(first[2], IngestReport):
        print(f"\nrejections by code: {dict(sorted(first[2].reasons.items()))}")


if __name__ == "__main__":
    main()
