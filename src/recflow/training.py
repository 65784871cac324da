"""The train stage: tune and fit ALS, train the ranker, and write the backtest and production bundles.

Windows (see features.py):
    1. FIT -> VALIDATION: ALS is tuned here; the best model's candidates, with features from FIT only and
       labels from VALIDATION, train the ranker.
    2. FIT + VALIDATION -> TEST: ALS refit with the chosen parameters; with the ranker this is the
       backtest bundle that `evaluate` scores on TEST, which nothing above has seen.
    3. everything: ALS refit on all events; with the same ranker this is the bundle to deploy.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from recflow.bundle import ModelBundle
from recflow.candidates import ALSParams, ImplicitCandidates, fit_als, tune_als
from recflow.config import Settings
from recflow.features import (
    PRODUCTION,
    SPLIT_TEST,
    SPLIT_VALIDATION,
    Interactions,
    Window,
    action_weights,
    atomic_path,
    confidence_matrix,
    load_interactions,
    window,
)
from recflow.metrics import ground_truth, recall_curve
from recflow.ranker import (
    RankerFit,
    action_grades,
    build_context,
    candidate_features,
    feature_names,
    grade_labels,
    train_ranker,
)

logger = logging.getLogger(__name__)

BACKTEST_DIR = "backtest"
BUNDLE_DIR = "bundle"
TRAIN_REPORT = "train_report.json"
IMPORTANCE_FILE = "feature_importance.csv"


@dataclass
class TrainReport:
    als_params: dict[str, Any]
    tuned: bool
    tuning_trials: list[dict[str, float]]
    candidate_recall: float  # validation recall@N of the ALS candidates handed to the ranker
    n_candidates: int
    ranker: dict[str, Any] | None
    seconds: dict[str, float] = field(default_factory=dict)


Progress = Callable[[str], None]


@contextmanager
def _timed(seconds: dict[str, float], name: str, progress: Progress | None) -> Iterator[None]:
    if progress:
        progress(name)
    began = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - began, 3)
    logger.info("%s took %.1f s", name, seconds[name])


def train(features: Path, models: Path, settings: Settings, *, progress: Progress | None = None) -> TrainReport:
    """Run the whole train stage; returns what was chosen and measured, also written to models/."""
    seconds: dict[str, float] = {}
    inter, meta = load_interactions(features)
    method = str(meta["summary"]["method"])  # the split the features were built with
    cuts = {k: float(v) for k, v in meta["cuts"].items()}
    weights = action_weights(settings, inter.actions)
    half_life = settings.features.half_life_days

    with _timed(seconds, "tune ALS", progress):
        inner = window(inter, SPLIT_VALIDATION, method, cuts)
        inner_matrix = confidence_matrix(inner.history, weights, half_life, inner.ref_time)
        truth = ground_truth(inner, inner_matrix)
        tuned = tune_als(inner_matrix, truth, settings.als)
    params = tuned.params
    n_candidates = settings.candidates.n
    inner_candidates = ImplicitCandidates(tuned.model, inner_matrix)

    rng = np.random.default_rng(settings.als.random_state)
    users = truth.users
    if len(users) > settings.ranker.max_train_users:
        users = np.sort(rng.choice(users, settings.ranker.max_train_users, replace=False))
    cand_items, cand_scores = inner_candidates.recommend(users, n_candidates)
    rows = np.searchsorted(truth.users, users)
    candidate_recall = recall_curve(cand_items, truth.relevant[rows], (n_candidates,))[n_candidates]

    ranker_fit: RankerFit | None = None
    if settings.ranker.enabled:
        with _timed(seconds, "train ranker", progress):
            ctx = build_context(inner.history, inner.ref_time, tuned.model.item_factors, settings.ranker)
            X, row_user, row_item = candidate_features(ctx, users, cand_items, cand_scores)
            labels = grade_labels(inner.target, row_user, row_item, action_grades(weights))
            names = feature_names(inter.actions, settings.ranker.popularity_windows_days)
            ranker_fit = train_ranker(X, labels, row_user, names, settings.ranker, seed=settings.als.random_state)

    for name, target_split, directory in (
        ("fit backtest ALS", SPLIT_TEST, BACKTEST_DIR),
        ("fit production ALS", PRODUCTION, BUNDLE_DIR),
    ):
        with _timed(seconds, name, progress):
            win = window(inter, target_split, method, cuts)
            bundle = _fit_bundle(inter, win, params, ranker_fit, settings, weights)
            bundle.info.update(window=directory, trained_at=datetime.now(UTC).isoformat(timespec="seconds"))
            bundle.save(models / directory)

    report = TrainReport(
        als_params=asdict(params),
        tuned=tuned.tuned,
        tuning_trials=tuned.trials,
        candidate_recall=candidate_recall,
        n_candidates=n_candidates,
        ranker=None
        if ranker_fit is None
        else {
            "best_iteration": ranker_fit.best_iteration,
            "validation_ndcg@10": ranker_fit.validation_ndcg,
            "train_queries": ranker_fit.train_queries,
            "validation_queries": ranker_fit.validation_queries,
            "feature_importance": ranker_fit.importances,
        },
        seconds=seconds,
    )
    _write_report(report, models)
    return report


def _fit_bundle(
    inter: Interactions,
    win: Window,
    params: ALSParams,
    ranker_fit: RankerFit | None,
    settings: Settings,
    weights: np.ndarray,
) -> ModelBundle:
    matrix = confidence_matrix(win.history, weights, settings.features.half_life_days, win.ref_time)
    model = fit_als(matrix, params)
    return ModelBundle(
        user_ids=inter.user_ids,
        item_ids=inter.item_ids,
        actions=inter.actions,
        action_weights=weights,
        half_life_days=settings.features.half_life_days,
        als_params=params,
        user_factors=model.user_factors,
        item_factors=model.item_factors,
        history=matrix,
        context=build_context(win.history, win.ref_time, model.item_factors, settings.ranker),
        ranker=None if ranker_fit is None else ranker_fit.booster,
        n_candidates=settings.candidates.n,
    )


def _write_report(report: TrainReport, models: Path) -> None:
    with atomic_path(models / TRAIN_REPORT) as tmp:
        tmp.write_text(json.dumps(asdict(report), indent=2))
    importances = (report.ranker or {}).get("feature_importance", {})
    total = sum(importances.values()) or 1.0
    lines = ["feature,importance"] + [
        f"{name},{value / total:.6f}" for name, value in sorted(importances.items(), key=lambda kv: -kv[1])
    ]
    with atomic_path(models / IMPORTANCE_FILE) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
