"""Speed and memory of the synthetic event generator.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_generate.py            # 10M events, 500k users
    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_generate.py --events 1000000 --drift

Prints the median wall time over --repeats runs, events per second and the peak resident memory of the process
(which includes the returned table).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time

import numpy as np
import pyarrow as pa

from recflow.config import GenerateSettings
from recflow.events.synth import DriftSpec, generate_events


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def machine() -> list[tuple[str, str]]:
    try:
        with open("/proc/meminfo") as meminfo:
            total_kib = int(meminfo.readline().split()[1])
        memory = f"{total_kib / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        memory = "unknown"
    return [
        ("machine", f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, {memory} RAM"),
        ("python", platform.python_version()),
        ("numpy / pyarrow", f"{np.__version__} / {pa.__version__}"),
        ("OPENBLAS_NUM_THREADS", os.environ.get("OPENBLAS_NUM_THREADS", "unset")),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=500_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--groups", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--drift", action="store_true", help="generate with the default DriftSpec")
    args = parser.parse_args(argv)

    settings = GenerateSettings(
        seed=args.seed, users=args.users, items=args.items, events=args.events, days=args.days, groups=args.groups
    )
    drift = DriftSpec() if args.drift else None
    seconds = []
    table_mb = 0.0
    for _ in range(args.repeats):
        started = time.perf_counter()
        table = generate_events(settings, drift=drift)
        seconds.append(time.perf_counter() - started)
        table_mb = table.nbytes / 2**20
        del table
    median = statistics.median(seconds)

    rows = [
        *machine(),
        ("events / users / items", f"{args.events:,} / {args.users:,} / {args.items:,}"),
        ("days / groups / drift", f"{args.days} / {args.groups} / {'yes' if drift else 'no'}"),
        ("runs (s)", ", ".join(f"{s:.2f}" for s in seconds)),
        ("median (s)", f"{median:.2f}"),
        ("events / s", f"{args.events / median:,.0f}"),
        ("table size (MiB)", f"{table_mb:,.0f}"),
        ("peak RSS (MiB)", f"{peak_rss_mb():,.0f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'metric':<{width}}  value")
    print(f"{'-' * width}  {'-' * 40}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
