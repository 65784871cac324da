"""The train stage: tune and fit ALS, train the ranker, and write the backtest and production bundles.

Windows (see features.py):
    1. FIT -> VALIDATION: ALS is tuned here. The tuned model's candidates (ALS top-N plus popular items),
       with features from FIT only and labels from VALIDATION, are the ranker's training queries; earlier
       windows (the cut moved back, each with its own ALS fit) add queries when one window has few users.
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
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares

from recflow.config import Settings, SplitSettings
from recflow.errors import EmptyDataError
from recflow.files import atomic_path
from recflow.model.bundle import ModelBundle, save_bundle_atomically
from recflow.model.candidates import (
    ALSParams,
    ImplicitCandidates,
    MergedCandidates,
    PopularityCandidates,
    fit_als,
    tune_als,
)
from recflow.model.features import (
    PRODUCTION,
    SPLIT_TEST,
    SPLIT_VALIDATION,
    Interactions,
    Window,
    action_weights,
    assign_split,
    confidence_matrix,
    load_interactions,
    window,
)
from recflow.model.metrics import GroundTruth, ground_truth, recall_curve
from recflow.model.ranker import RankerFit, action_grades, grade_labels, train_ranker
from recflow.model.ranker_features import build_context, candidate_features, feature_names

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
    candidate_recall: float  # validation recall of all candidates (ALS and popular) handed to the ranker
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

    ranker_fit: RankerFit | None = None
    with _timed(seconds, "ranker examples", progress):
        examples = ranker_examples(inner, inner_matrix, truth, tuned.model, params, method, settings, weights)
    if settings.ranker.enabled:
        with _timed(seconds, "train ranker", progress):
            names = feature_names(inter.actions, settings.ranker.popularity_windows_days)
            ranker_fit = train_ranker(
                examples.X, examples.labels, examples.query, names, settings.ranker, seed=settings.als.random_state
            )

    previous = tuned.model  # each refit starts from the factors of the fit before it, which saw only earlier events
    for name, target_split, directory in (
        ("fit backtest ALS", SPLIT_TEST, BACKTEST_DIR),
        ("fit production ALS", PRODUCTION, BUNDLE_DIR),
    ):
        with _timed(seconds, name, progress):
            win = window(inter, target_split, method, cuts)
            bundle, previous = _fit_bundle(inter, win, params, ranker_fit, settings, weights, previous)
            bundle.info.update(window=directory, trained_at=datetime.now(UTC).isoformat(timespec="seconds"))
            save_bundle_atomically(bundle, models / directory)

    report = TrainReport(
        als_params=asdict(params),
        tuned=tuned.tuned,
        tuning_trials=tuned.trials,
        candidate_recall=examples.candidate_recall,
        n_candidates=n_candidates,
        ranker=None
        if ranker_fit is None
        else {
            "best_iteration": ranker_fit.best_iteration,
            "validation_ndcg@10": ranker_fit.validation_ndcg,
            "train_queries": ranker_fit.train_queries,
            "validation_queries": ranker_fit.validation_queries,
            "windows": examples.windows,  # stacked windows the training queries came from
            "feature_importance": ranker_fit.importances,
        },
        seconds=seconds,
    )
    _write_report(report, models)
    return report


@dataclass(frozen=True)
class RankerExamples:
    """The ranker's training set: one row per (window, user, candidate), rows of one query contiguous."""

    X: np.ndarray
    labels: np.ndarray
    query: np.ndarray  # int64, window * n_users + user
    candidate_recall: float  # recall of all candidates in the newest window
    windows: int


def earlier_window(history: Interactions, method: str, fraction: float) -> Window:
    """The window at the end of a history: its last `fraction` of events, cut as the features stage cuts."""
    labels, cuts = assign_split(history, SplitSettings(method=method, test_fraction=fraction, validation_fraction=0.0))
    return window(Interactions(**{**history.__dict__, "split": labels}), SPLIT_TEST, method, cuts)


def ranker_examples(
    first: Window,
    first_matrix: sp.csr_matrix,
    first_truth: GroundTruth,
    first_model: AlternatingLeastSquares,
    params: ALSParams,
    method: str,
    settings: Settings,
    weights: np.ndarray,
) -> RankerExamples:
    """Candidates, features and labels of up to `ranker.windows` windows, the FIT -> VALIDATION one first.

    Each earlier window moves the cut back by as many events as the validation window holds and gets its own
    ALS fit on its own history (with the tuned parameters), so no window's features or candidates see its
    labels. Earlier windows are added only while fewer than `ranker.max_train_users` queries were collected:
    where one window already has enough users (large data) no extra ALS fit is paid for.
    """
    conf = settings.ranker
    n = settings.candidates.n
    half_life = settings.features.half_life_days
    grades = action_grades(weights)
    rng = np.random.default_rng(settings.als.random_state)
    fraction = len(first.target) / max(len(first.history), 1)
    n_users = first_matrix.shape[0]
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    collected, recall = 0, 0.0
    win, matrix, truth, model = first, first_matrix, first_truth, first_model
    for index in range(max(conf.windows, 1) if conf.enabled else 1):
        if index > 0:
            if collected >= conf.max_train_users or not 0.0 < fraction < 1.0:
                break
            try:
                win = earlier_window(win.history, method, fraction)
            except EmptyDataError:
                break
            matrix = confidence_matrix(win.history, weights, half_life, win.ref_time)
            truth = ground_truth(win, matrix)
            if len(truth.users) == 0:
                break
            model = fit_als(matrix, params)
        users = truth.users
        quota = conf.max_train_users - collected
        if len(users) > quota:
            users = np.sort(rng.choice(users, quota, replace=False))
        generator = MergedCandidates(
            ImplicitCandidates(model, matrix), PopularityCandidates(matrix), settings.candidates.popular
        )
        candidates = generator.candidates(users, n)
        if index == 0:
            rows = np.searchsorted(truth.users, users)
            width = candidates.items.shape[1]
            recall = recall_curve(candidates.items, truth.relevant[rows], (width,))[width]
            if not conf.enabled:
                break
        ctx = build_context(win.history, win.ref_time, model.item_factors, conf)
        X, row_user, row_item = candidate_features(ctx, users, candidates)
        labels = grade_labels(win.target, row_user, row_item, grades)
        parts.append((X, labels, index * n_users + row_user))
        collected += len(users)
        logger.info("ranker window %d: %d users, %d candidates", index, len(users), len(X))
    if not parts:
        empty = np.zeros(0)
        return RankerExamples(empty.reshape(0, 0), empty.astype(np.int32), empty.astype(np.int64), recall, 0)
    X, labels, query = (np.concatenate(column) for column in zip(*parts, strict=True))
    return RankerExamples(X, labels, query, recall, len(parts))


def _fit_bundle(
    inter: Interactions,
    win: Window,
    params: ALSParams,
    ranker_fit: RankerFit | None,
    settings: Settings,
    weights: np.ndarray,
    previous: AlternatingLeastSquares,
) -> tuple[ModelBundle, AlternatingLeastSquares]:
    matrix = confidence_matrix(win.history, weights, settings.features.half_life_days, win.ref_time)
    model = fit_als(matrix, params, warm_start=previous if settings.als.refit_iterations else None,
                    iterations=settings.als.refit_iterations)  # fmt: skip
    bundle = ModelBundle(
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
        n_popular=settings.candidates.popular,
    )
    return bundle, model


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
