"""The train stage: choose and fit the served model on validation folds, write the backtest and deployable bundles.

1. Selection (selection.py): validation folds cut inside the data before the features stage's TEST window
   choose the decay, ALS's parameters, the popularity window, the item-item model, the ranker, and the model
   kind that is served: the one with the best NDCG@10 on users nothing was tuned on.
2. Backtest bundle: the choices fitted on everything before TEST, as of the TEST window's moment; `evaluate`
   scores it on TEST, which no choice saw.
3. Deployable bundle: fitted on all events, as of their end, with the choices of a second selection on all
   events, whose folds are nearer the data the bundle is fitted on (under the per-user protocols they hold 80% of
   each user's events, the first selection's 64%; on ml-1m that difference turned a tie into the wrong choice). When
   the first selection's folds were full (`selection.max_users` per protocol), the second keeps its decay and ALS
   parameters, whose search is most of a selection's cost. When the first
   selection chose on a sample of `selection.sample_users` users (the largest data), the deployable takes its
   choices and ranker, so selection runs once there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recflow.config import Settings
from recflow.files import atomic_path
from recflow.model.bundle import save_bundle_atomically
from recflow.model.features import (
    PRODUCTION,
    SPLIT_TEST,
    Window,
    action_weights,
    load_interactions,
    window,
)
from recflow.model.profile import DataProfile, profile_interactions
from recflow.model.selection import fit_bundle, select

logger = logging.getLogger(__name__)

BACKTEST_DIR = "backtest"
BUNDLE_DIR = "bundle"
TRAIN_REPORT = "train_report.json"
IMPORTANCE_FILE = "feature_importance.csv"
KEPT_TRIALS = ("half_life_days", "als")  # what a second selection takes from the first


@dataclass
class TrainReport:
    kind: str  # the served model kind
    decided: str  # why
    choices: dict[str, Any]
    validation: dict[str, dict[str, Any]]  # kind -> validation NDCG@10 with its interval and users
    folds: list[dict[str, Any]]
    warnings: list[str]
    trials: dict[str, list[dict[str, Any]]]
    ranker: dict[str, Any] | None
    profile: dict[str, Any]
    backtest: dict[str, Any]  # what selection chose on the data before the test window, and whether it serves
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def als_params(self) -> dict[str, Any]:
        return dict(self.choices["als"])


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
    profile = _profile(meta, inter)

    trained_at = datetime.now(UTC).isoformat(timespec="seconds")
    training_id = uuid.uuid4().hex  # one id in both bundles, the report and (by evaluate) metrics.json

    def window_of(directory: str) -> Window:  # made when needed: one window of 10M events alive at a time
        return window(inter, SPLIT_TEST if directory == BACKTEST_DIR else PRODUCTION, method, cuts)

    with _timed(seconds, f"select {BACKTEST_DIR}", progress):
        outcomes = {BACKTEST_DIR: select(window_of(BACKTEST_DIR).history, profile, settings, weights, progress)}
    outcomes[BUNDLE_DIR] = outcomes[BACKTEST_DIR]
    kept = False  # whether the second selection kept the first's decay and ALS parameters
    if not outcomes[BACKTEST_DIR][2].sampled:  # chosen again on all events: folds nearer the deployable's data
        first, _, first_report = outcomes[BACKTEST_DIR]
        # a first search that judged every user it could keeps its decay and ALS parameters (that search, ALS fits
        # per trial and fold, is most of a selection's cost)
        kept = first_report.full
        again = settings
        if kept:
            again = settings.replace("features", half_life_days=first.half_life_days).replace(
                "als",
                factors=first.als.factors,
                regularization=first.als.regularization,
                alpha=first.als.alpha,
                tune=dataclasses.replace(settings.als.tune, enabled=False),
            )
        with _timed(seconds, f"select {BUNDLE_DIR}", progress):
            outcomes[BUNDLE_DIR] = select(window_of(BUNDLE_DIR).history, profile, again, weights, progress)
    last_als = None  # the backtest's ALS fit, when the deployable repeats its choices
    for directory in (BACKTEST_DIR, BUNDLE_DIR):
        chosen, ranker, chosen_by = outcomes[directory]
        warm_start = chosen_by.als_start  # a fold's fit with the chosen parameters
        if directory == BUNDLE_DIR and chosen_by is outcomes[BACKTEST_DIR][2]:
            warm_start = last_als  # the same choices: start from the backtest's factors
        with _timed(seconds, f"fit {directory}", progress):
            win = window_of(directory)
            fitted, last_als = fit_bundle(
                win.history,
                float(win.ref_time.max()),
                chosen,
                settings,
                weights,
                ranker=ranker,
                warm_start=warm_start if settings.als.refit_iterations else None,
            )
            fitted.info.update(window=directory, trained_at=trained_at, kind=chosen.kind, decided=chosen_by.decided,
                               training_id=training_id)  # fmt: skip
            save_bundle_atomically(fitted, models / directory)
            del fitted, win
    test_choices, _, test_selection = outcomes[BACKTEST_DIR]
    choices, ranker_fit, selection = outcomes[BUNDLE_DIR]

    report = TrainReport(
        kind=choices.kind,
        decided=selection.decided,
        choices=selection.choices,
        validation=selection.models,
        folds=selection.folds,
        warnings=selection.warnings,
        # a second selection kept the first's decay and ALS parameters: their trials are the first's
        trials={**selection.trials, **{k: v for k, v in test_selection.trials.items() if kept and k in KEPT_TRIALS}},
        ranker=selection.ranker if ranker_fit is not None or selection.ranker else None,
        profile=profile.as_dict(),
        backtest={
            "kind": test_choices.kind,
            "decided": test_selection.decided,
            "choices": test_selection.choices,
            "deployable": (
                "chosen again on all events" + (" (the decay and ALS's parameters kept)" if kept else "")
                if selection is not test_selection
                else "the same choices"
            ),
        },
        seconds=seconds,
    )
    _write_report(report, models)
    return report


def _profile(meta: dict[str, Any], inter: Any) -> DataProfile:
    stored = meta.get("profile")
    if isinstance(stored, dict):
        return DataProfile(**{k: v for k, v in stored.items() if k != "validation_protocols"})
    return profile_interactions(inter)


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
