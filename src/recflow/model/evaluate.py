"""The evaluate stage: score the two-stage model and the baselines on the held-out test window.

Every model ranks the full catalogue for the same users, with what each user already had excluded.
Baselines: time-decayed popularity, item-kNN (BM25), ALS alone; all fitted on the backtest history.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recflow.config import Settings
from recflow.files import atomic_path
from recflow.model.bundle import ModelBundle
from recflow.model.candidates import PopularityCandidates, Recommender, item_knn
from recflow.model.features import SPLIT_TEST, load_interactions, window
from recflow.model.metrics import ground_truth, ranking_metrics, recall_curve
from recflow.model.training import BACKTEST_DIR

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CURVE_FILE = "recall_at_k.csv"
MODEL_NAMES = ("popularity", "item_knn", "als", "als_ranker")


@dataclass(frozen=True)
class EvaluationReport:
    users: int  # test users scored
    test_users: int  # test users available (warm users with a new item in the test window)
    metrics: dict[str, dict[str, float]]  # model -> metric -> value
    curve: dict[str, dict[int, float]]  # model -> k -> recall@k


class _TwoStage:
    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle

    def recommend(self, users: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.bundle.recommend(users, n)


def evaluate(
    features: Path,
    models: Path,
    reports: Path,
    settings: Settings,
    *,
    progress: Callable[[str], None] | None = None,
) -> EvaluationReport:
    inter, meta = load_interactions(features)
    bundle = ModelBundle.load(models / BACKTEST_DIR)
    cuts = {k: float(v) for k, v in meta["cuts"].items()}
    test = window(inter, SPLIT_TEST, str(meta["summary"]["method"]), cuts)
    truth = ground_truth(test, bundle.history)
    conf = settings.evaluate
    users, relevant = truth.users, truth.relevant
    if len(users) > conf.max_users:
        rows = np.sort(np.random.default_rng(conf.seed).choice(len(users), conf.max_users, replace=False))
        users, relevant = users[rows], relevant[rows]
    depth = max(conf.k, conf.recall_k, *conf.curve_ks)
    recommenders: dict[str, Callable[[], Recommender]] = {
        "popularity": lambda: PopularityCandidates(bundle.history),
        "item_knn": lambda: item_knn(bundle.history),
        "als": lambda: bundle.als_candidates,
        "als_ranker": lambda: _TwoStage(bundle),
    }
    if bundle.ranker is None:
        del recommenders["als_ranker"]
    n_catalogue = int((np.asarray(bundle.history.getnnz(axis=0)) > 0).sum())
    metrics: dict[str, dict[str, float]] = {}
    curve: dict[str, dict[int, float]] = {}
    for name, make in recommenders.items():
        if progress:
            progress(name)
        recs, _ = make().recommend(users, depth)
        metrics[name] = ranking_metrics(recs, relevant, k=conf.k, recall_k=conf.recall_k, n_catalogue=n_catalogue)
        curve[name] = recall_curve(recs, relevant, conf.curve_ks)
        logger.info("%s: %s", name, metrics[name])
    report = EvaluationReport(users=len(users), test_users=len(truth.users), metrics=metrics, curve=curve)
    _write(report, models, reports)
    return report


def _write(report: EvaluationReport, models: Path, reports: Path) -> None:
    payload = {**report.metrics, "users": report.users, "test_users": report.test_users}
    with atomic_path(models / METRICS_FILE) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
    names = list(report.curve)
    ks = sorted(next(iter(report.curve.values())))
    lines = [",".join(["k", *names])]
    lines += [",".join([str(k), *(f"{report.curve[m][k]:.6f}" for m in names)]) for k in ks]
    with atomic_path(reports / CURVE_FILE) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
