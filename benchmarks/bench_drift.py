"""Calibration of the drift check: per-column scores, false alarms and misses over many generated seeds.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_drift.py                       # seeds 100-119
    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/bench_drift.py --with-model --seeds 101-106

Each seed generates 35 days twice: once from one distribution, once with the generator's drift option from day 28
on (popularity shift, new items, fewer conversions), so the current window (the last 7 days) is drifted. The
check runs with params.yaml `drift` (event and user aggregates; with --with-model also the ranker's candidates,
from a bundle trained on the 28 days before the current window: slower). The table gives, per column, the
largest score without drift and the smallest with drift, beside the threshold; then false alarms and misses.
The thresholds in params.yaml were set from these runs; tests/unit/test_drift.py checks them on other seeds.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from _common import machine, print_table

from recflow.config import GenerateSettings, Settings, load_settings
from recflow.events.synth import DEFAULT_START, DriftSpec, generate_events
from recflow.ops.drift import check_drift

DAYS, DRIFT_DAY = 35, 28


def run(
    seed: int, drift: bool, events: int, settings: Settings, with_model: bool
) -> tuple[dict[str, bool], dict[str, float]]:
    from recflow.model import training
    from recflow.model.features import build_features
    from recflow.store.eventstore import ingest_table

    conf = GenerateSettings(seed=seed, users=2000, items=500, events=events, days=DAYS, groups=8)
    table = generate_events(conf, drift=DriftSpec(start_fraction=DRIFT_DAY / DAYS) if drift else None)
    cut = pa.scalar(DEFAULT_START + timedelta(days=DRIFT_DAY), type=table["timestamp"].type)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        paths = settings.paths
        store = {
            "store": root / paths.store,
            "rejected": root / paths.rejected,
            "settings": settings.events,
            "now": datetime(2100, 1, 1, tzinfo=UTC),
        }
        ingest_table(table.filter(pc.less(table["timestamp"], cut)), source="before", **store)
        if with_model:
            build_features(root / paths.store, root / paths.features, settings)
            training.train(root / paths.features, root / paths.models, settings)
        ingest_table(table.filter(pc.greater_equal(table["timestamp"], cut)), source="current", **store)
        result = check_drift(settings, root=root)
    flags = {"verdict": result.drifted, **{d.name: d.drifted for d in result.datasets}}
    return flags, {f"{d.name}.{c.column}": c.score for d in result.datasets for c in d.columns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="100-119", help="first-last (inclusive)")
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--with-model", action="store_true", help="train a bundle per seed: compare candidates too")
    args = parser.parse_args()
    first, last = (int(x) for x in args.seeds.split("-"))
    settings = load_settings()
    if args.with_model:  # a quick bundle: the check needs a model, not the best one
        settings = settings.replace("als", iterations=8, tune=settings.als.tune.__class__(enabled=False))
        settings = settings.replace("ranker", n_estimators=60)
    scores: dict[tuple[str, bool], list[float]] = defaultdict(list)
    flagged: dict[tuple[str, bool], int] = defaultdict(int)
    for drift in (False, True):
        for seed in range(first, last + 1):
            flags, row = run(seed, drift, args.events, settings, args.with_model)
            for name, value in flags.items():
                flagged[(name, drift)] += value
            for column, score in row.items():
                scores[(column, drift)].append(score)
    n = last - first + 1
    thresholds = {}
    for name in ("events", "users", "candidates"):
        check = getattr(settings.drift, name)
        for column, _ in scores:
            if column.startswith(f"{name}."):
                field = column.split(".", 1)[1]
                default = check.cat_threshold if name == "events" else check.num_threshold
                thresholds[column] = check.per_column_threshold.get(field, default)
    rows = [
        [column, max(scores[(column, False)]), min(scores[(column, True)]), thresholds[column]]
        for column in sorted({c for c, _ in scores})
    ]
    print(machine())
    print_table(
        f"drift scores over seeds {first}-{last}, {args.events:,} events (distance methods: drift when >= threshold)",
        ["column", "max without drift", "min with drift", "threshold"],
        rows,
    )
    print_table(
        f"flagged over {n} seeds without and {n} with drift",
        ["", "false alarms", "misses"],
        [[name, flagged[(name, False)], n - flagged[(name, True)]] for name in sorted({k for k, _ in flagged})],
    )


if __name__ == "__main__":
    main()
