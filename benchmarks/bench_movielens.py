"""Accuracy and speed of the whole pipeline on MovieLens 100K (never part of the repo).

Protocol A: each user's last 20% of events (by time) is the test set.
Protocol B: a global time split at the 80% quantile of time.
Tuning and ranker training use a validation split inside the training part only.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_movielens.py [--data ../shared/data/ml-100k] [--repeats 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, print_table

from recflow.config import load_settings
from recflow.events.fileio import write_events
from recflow.events.importers import import_movielens
from recflow.model.evaluate import evaluate
from recflow.model.features import build_features
from recflow.model.training import train
from recflow.store.eventstore import ingest_files

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = {"A": "per_user", "B": "global_time"}


def run_pipeline(data: Path, method: str, work: Path) -> tuple[dict[str, dict[str, float]], float, dict[str, float]]:
    """Import, ingest, features, train and evaluate in `work`; returns metrics, seconds and train params."""
    settings = load_settings(REPO / "params.yaml")
    settings = settings.replace("features", split=settings.features.split.__class__(method, 0.2, 0.2))
    began = time.perf_counter()
    events = work / "inbox" / "ml-100k.parquet"
    write_events(import_movielens(data), events)
    ingest_files([events], store=work / "store", rejected=work / "rejected", settings=settings.events)
    build_features(work / "store", work / "features", settings)
    report = train(work / "features", work / "models", settings)
    result = evaluate(work / "features", work / "models", work / "reports", settings)
    return result.metrics, time.perf_counter() - began, report.als_params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ml-100k")
    parser.add_argument("--repeats", type=int, default=3, help="pipeline runs per protocol (median time)")
    args = parser.parse_args()
    if not (args.data / "u.data").exists():
        print(f"skipped: MovieLens 100K not found at {args.data} (pass --data DIR)")
        return 0
    print(machine())
    rows, timing = [], []
    for name, method in PROTOCOLS.items():
        seconds = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as work:
                metrics, elapsed, params = run_pipeline(args.data, method, Path(work))
            seconds.append(elapsed)
        for model, m in metrics.items():
            rows.append([name, model, m["ndcg@10"], m["recall@20"], m["hit_rate@10"], m["map@10"], m["coverage@10"]])
        chosen = ", ".join(f"{k}={v}" for k, v in params.items() if k in ("factors", "regularization", "alpha"))
        timing.append([name, f"{statistics.median(seconds):.1f}", " ".join(f"{s:.1f}" for s in seconds), chosen])
    print_table(
        "MovieLens 100K, test window never seen in training or tuning",
        ["protocol", "model", "NDCG@10", "Recall@20", "HR@10", "MAP@10", "coverage@10"],
        rows,
    )
    print_table(
        "whole pipeline (import, ingest, features, train incl. tuning, evaluate)",
        ["protocol", "median s", "runs s", "chosen ALS params (last run)"],
        timing,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
