"""The event contract's two executions on a request's batch, in process: the row-wise validator the service uses
(`rowwise.validate_rows`) against the batch validator built for files (`contract.validate_records`: Arrow compute
per check, a duckdb query for the derived event ids), on the same records.

Each batch is valid events of distinct users without event ids (so every id is derived), and the same batch with
every tenth event broken, the first included (future timestamps, unknown actions). Each figure is the median of
--repeats calls after a warm-up; ratio = batch / row-wise.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_validation.py --sizes 1 100 250 1000
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from _common import machine, print_table

from recflow.config import EventSettings
from recflow.events.contract import validate_records
from recflow.events.rowwise import validate_rows

SETTINGS = EventSettings()


def batch(n: int, *, broken: bool) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = [
        {"user_id": f"u{i}", "item_id": f"i{i % 97}", "action": "purchase", "timestamp": "2026-11-24T09:00:00Z"}
        for i in range(n)
    ]
    if broken:
        for i in range(0, n, 10):
            records[i] |= {"timestamp": "2999-01-01T00:00:00Z"} if i % 20 else {"action": "clik"}
    return records


def median_ms(validate: Callable[..., Any], records: Sequence[dict[str, Any]], repeats: int) -> float:
    validate(records, settings=SETTINGS)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        validate(records, settings=SETTINGS)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 100, 250, 1000])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        for broken in (False, True):
            records = batch(n, broken=broken)
            repeats = max(10, args.repeats // max(1, n // 100))
            rowwise = median_ms(validate_rows, records, repeats)
            columns = median_ms(validate_records, records, repeats)
            kind = "every 10th broken" if broken else "all valid"
            rows.append([n, kind, columns, rowwise, f"{columns / rowwise:.1f}x"])
    print(machine())
    print(f"run at {datetime.now(UTC).isoformat(timespec='seconds')}")
    print_table(
        "Validating a request's events (median ms per call)",
        ["events", "batch", "validate_records ms", "validate_rows ms", "ratio"],
        rows,
    )


if __name__ == "__main__":
    main()
