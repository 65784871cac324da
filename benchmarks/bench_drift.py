"""Calibration of the drift check on generated data: per-column distances, false alarms and misses over many seeds.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_drift.py                            # seeds 100-111
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_drift.py --with-model --seeds 101-103 --users 2000

Each seed generates the demo's data (params.yaml `generate`, or --users/--events smaller) twice: once from one
distribution, once with the generator's drift option for the last 7 days (popularity shift, new items, fewer
conversions), so the current window is drifted. The check runs with params.yaml `drift` (with --with-model also
the ranker's candidates, from a bundle trained on the days before the current window: slower). The table gives,
per column, the largest distance without drift and the smallest with drift beside the floor (min_effect) the
data set's distances must reach: the floors in params.yaml sit between the two. Real windows:
benchmarks/bench_drift_real.py.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from recflow.threads import limit_blas_threads


def run(
    seed: int, drift: bool, conf: GenerateSettings, settings: Settings, with_model: bool
) -> tuple[dict[str, bool], dict[str, float]]:
    from recflow.model import training
    from recflow.model.features import build_features
    from recflow.store.eventstore import ingest_table

    conf = dataclasses.replace(conf, seed=seed)
    drift_day = conf.days - 7
    table = generate_events(conf, drift=DriftSpec(start_fraction=drift_day / conf.days) if drift else None)
    cut = pa.scalar(DEFAULT_START + timedelta(days=drift_day), type=table["timestamp"].type)
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
    parser.add_argument("--seeds", default="100-111", help="first-last (inclusive)")
    parser.add_argument("--users", type=int, help="generated users (default: params.yaml generate.users)")
    parser.add_argument("--events", type=int, help="generated events (default: params.yaml generate.events)")
    parser.add_argument("--with-model", action="store_true", help="train a bundle per seed: compare candidates too")
    args = parser.parse_args()
    limit_blas_threads()  # --with-model trains in this process: BLAS threads as the CLI sets them
    first, last = (int(x) for x in args.seeds.split("-"))
    settings = load_settings()
    conf = settings.generate
    conf = dataclasses.replace(conf, users=args.users or conf.users, events=args.events or conf.events)
    if args.with_model:  # a quick bundle: the check needs a model, not the best one
        settings = settings.replace("als", iterations=8, tune=settings.als.tune.__class__(enabled=False))
        settings = settings.replace("ranker", n_estimators=60)
        settings = settings.replace("selection", models=("als_ranker",))
    scores: dict[tuple[str, bool], list[float]] = defaultdict(list)
    flagged: dict[tuple[str, bool], int] = defaultdict(int)
    for drift in (False, True):
        for seed in range(first, last + 1):
            flags, row = run(seed, drift, conf, settings, args.with_model)
            for name, value in flags.items():
                flagged[(name, drift)] += value
            for column, score in row.items():
                scores[(column, drift)].append(score)
    n = last - first + 1
    floors = {
        f"{name}.{column}": getattr(settings.drift, name).per_column_min_effect.get(
            column, getattr(settings.drift, name).min_effect
        )
        for name, column in (key.split(".", 1) for key, _ in scores)
    }
    rows = [
        [column, max(scores[(column, False)]), min(scores[(column, True)]), floors[column]]
        for column in sorted({c for c, _ in scores})
    ]
    print(machine())
    print_table(
        f"drift distances over seeds {first}-{last}, {conf.users:,} users, {conf.events:,} events",
        ["column", "max without drift", "min with drift", "floor (min_effect)"],
        rows,
    )
    print_table(
        f"flagged over {n} seeds without and {n} with drift",
        ["", "false alarms", "misses"],
        [[name, flagged[(name, False)], n - flagged[(name, True)]] for name in sorted({k for k, _ in flagged})],
    )


if __name__ == "__main__":
    main()
