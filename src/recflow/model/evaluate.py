"""The evaluate stage: score what is served, beside the baselines, on events the model never trained on.

Two ways, one scoring function (model.scoring, as `recommend` and the service use it):

- `evaluate`: the backtest bundle (the train stage's choices fitted on everything before the TEST window)
  on the TEST window, as of the window's moment (the cut for a global time split, the end of the training
  part otherwise, as `recflow recommend` answers as of the end of its data).
- `evaluate_holdout`: the deployable bundle on a file of held-out events (`recflow evaluate --holdout`), as of
  the end of the data it was trained on: relevant = each user's held-out items the user did not have.

Every model ranks the full catalogue for the same users, with what each user already had excluded; each metric
comes with its number of users and a bootstrap 95% interval, and a warning below `selection.min_users`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import scipy.sparse as sp

from recflow.config import EvaluateSettings, Settings
from recflow.constants import ITEM_ID, USER_ID
from recflow.errors import InputFileError
from recflow.files import atomic_path
from recflow.model.bundle import BUNDLE_FILE, ModelBundle
from recflow.model.candidates import ease_bytes, ease_weights, knn_similarity
from recflow.model.features import SPLIT_TEST, Interactions, Window, load_interactions, window
from recflow.model.metrics import (
    GroundTruth,
    bootstrap_interval,
    ground_truth,
    ndcg_per_user,
    new_items,
    ranking_metrics,
    recall_curve,
)
from recflow.model.scoring import KIND_ALS, KIND_EASE, KIND_ITEM_KNN, KIND_POPULARITY, KIND_TWO_STAGE
from recflow.model.training import BACKTEST_DIR, BUNDLE_DIR

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CURVE_FILE = "recall_at_k.csv"
SERVED = "served"


@dataclass(frozen=True)
class EvaluationReport:
    users: int  # test users scored
    test_users: int  # test users available (warm users with a new item in the test window)
    metrics: dict[str, dict[str, float]]  # model -> metric -> value
    curve: dict[str, dict[int, float]]  # model -> k -> recall@k
    intervals: dict[str, list[float]] = field(default_factory=dict)  # model -> NDCG@k 95% interval
    served_kind: str = ""
    warnings: list[str] = field(default_factory=list)
    training_id: str = ""  # of the bundle scored (train writes one id into both bundles)


def evaluate(
    features: Path,
    models: Path,
    reports: Path,
    settings: Settings,
    *,
    progress: Callable[[str], None] | None = None,
) -> EvaluationReport:
    """The evaluate stage: the backtest bundle and the baselines on the TEST window."""
    bundle = ModelBundle.load(models / BACKTEST_DIR)
    _, test = test_window(features)
    report = score_bundle(bundle, ground_truth(test, bundle.history), settings, progress=progress)
    report = dataclasses.replace(report, training_id=str(bundle.info.get("training_id", "")))
    deployable = models / BUNDLE_DIR
    served = ModelBundle.read_meta(deployable).get("kind") if (deployable / BUNDLE_FILE).exists() else None
    if served and served != bundle.kind:  # the deployable's choice was made again on all events (training.py)
        report.warnings.append(
            f"the deployable model serves {served}, chosen again on all events; the test window scores "
            f"{bundle.kind}, chosen on the data before it: `recflow evaluate --holdout FILE` scores what serves"
        )
    _write(report, models, reports)
    return report


def evaluate_holdout(
    path: Path, models: Path, settings: Settings, *, progress: Callable[[str], None] | None = None
) -> EvaluationReport:
    """The deployable bundle on a file of held-out events (any event file `recflow ingest` reads)."""
    from recflow.events.contract import validate_table
    from recflow.events.fileio import read_event_file

    bundle = ModelBundle.load(models / BUNDLE_DIR)
    table, rejected = read_event_file(path)
    batch = validate_table(table, settings=settings.events, source=str(path))
    rejected = [*rejected, *batch.rejected]
    if batch.accepted.num_rows == 0:
        raise InputFileError(f"{path} holds no valid event ({len(rejected)} rejected): nothing to evaluate")
    users = np.asarray([bundle.user_index.get(u, -1) for u in batch.accepted[USER_ID].to_pylist()], dtype=np.int64)
    item_index = {item: i for i, item in enumerate(bundle.item_ids)}
    # items the model never saw are relevant too (a miss for every model): one column each past the catalogue
    unknown_items: dict[str, int] = {}
    n_items = len(bundle.item_ids)
    items = np.asarray(
        [
            item_index[i] if i in item_index else unknown_items.setdefault(i, n_items + len(unknown_items))
            for i in batch.accepted[ITEM_ID].to_pylist()
        ],
        dtype=np.int64,
    )
    known = users >= 0
    shape = (bundle.history.shape[0], n_items + len(unknown_items))
    target = sp.csr_matrix((np.ones(int(known.sum()), dtype=np.float32), (users[known], items[known])), shape=shape)
    truth = new_items(target, bundle.history)
    warnings = []
    unknown_users = len(set(pc.unique(batch.accepted[USER_ID]).to_pylist()) - set(bundle.user_index))
    if unknown_users:
        warnings.append(f"{unknown_users} held-out users are not in the training data (cold users are not scored)")
    if unknown_items:
        warnings.append(f"{len(unknown_items)} held-out items are not in the model: relevant, never recommended")
    if rejected:
        warnings.append(f"{len(rejected)} held-out records rejected by the event contract")
    return score_bundle(bundle, truth, settings, progress=progress, warnings=warnings)


def test_window(features: Path) -> tuple[Interactions, Window]:
    """The features' events and their TEST window (history before it, the held-out events in it)."""
    inter, meta = load_interactions(features)
    cuts = {k: float(v) for k, v in meta["cuts"].items()}
    return inter, window(inter, SPLIT_TEST, str(meta["summary"]["method"]), cuts)


def sample_users(truth: GroundTruth, conf: EvaluateSettings) -> GroundTruth:
    """At most `evaluate.max_users` of the judged users: a fixed random sample (the same in evaluate and the gate)."""
    if len(truth.users) <= conf.max_users:
        return truth
    rows = np.sort(np.random.default_rng(conf.seed).choice(len(truth.users), conf.max_users, replace=False))
    return GroundTruth(truth.users[rows], truth.relevant[rows])


def score_bundle(
    bundle: ModelBundle,
    truth: GroundTruth,
    settings: Settings,
    *,
    progress: Callable[[str], None] | None = None,
    warnings: list[str] | None = None,
) -> EvaluationReport:
    """The served model and the baselines the bundle can score (same history, same moment) on `truth`."""
    conf = settings.evaluate
    warnings = list(warnings or [])
    sample = sample_users(truth, conf)
    users, relevant = sample.users, sample.relevant
    if len(users) < settings.selection.min_users:
        warnings.append(
            f"only {len(users)} users to evaluate (< selection.min_users={settings.selection.min_users}): "
            "the intervals below are wide and the ranking of models may be noise"
        )
    depth = max(conf.k, conf.recall_k, *conf.curve_ks)
    n_catalogue = int((np.asarray(bundle.history.getnnz(axis=0)) > 0).sum())
    served_item_item = bundle.item_item
    weighting = str(bundle.info.get("knn_weighting", "bm25"))
    item_item = {KIND_ITEM_KNN: lambda: knn_similarity(bundle.history, settings.selection.knn_neighbours, weighting)}
    if 2 * ease_bytes(bundle.history.shape[1]) <= settings.selection.ease_max_gb * 1e9:  # the served one + EASE
        lam = float(bundle.info.get("ease_lambda", settings.selection.ease_lambdas[-1]))
        item_item[KIND_EASE] = lambda: ease_weights(bundle.history, lam)
    kinds = [KIND_POPULARITY, KIND_ITEM_KNN, KIND_EASE, KIND_ALS]
    if bundle.ranker is not None:
        kinds.append(KIND_TWO_STAGE)
    metrics: dict[str, dict[str, float]] = {}
    curve: dict[str, dict[int, float]] = {}
    intervals: dict[str, list[float]] = {}
    for name in [SERVED, *kinds]:
        kind = bundle.kind if name == SERVED else name
        if name in item_item:
            if kind not in item_item:
                continue
            bundle.item_item = item_item[kind]()
        else:
            bundle.item_item = served_item_item
        if progress:
            progress(name)
        recs, _ = bundle.recommend(users, depth, kind=kind)
        values = ranking_metrics(recs, relevant, k=conf.k, recall_k=conf.recall_k, n_catalogue=n_catalogue)
        metrics[name] = {**values, "users": float(len(users))}
        intervals[name] = list(bootstrap_interval(ndcg_per_user(recs, relevant, conf.k), settings.selection.bootstrap))
        curve[name] = recall_curve(recs, relevant, conf.curve_ks)
        logger.info("%s: %s", name, metrics[name])
    bundle.item_item = served_item_item
    return EvaluationReport(
        users=len(users),
        test_users=len(truth.users),
        metrics=metrics,
        curve=curve,
        intervals=intervals,
        served_kind=bundle.kind,
        warnings=warnings,
    )


def load_report(path: Path) -> EvaluationReport:
    """An EvaluationReport from the metrics.json `evaluate` wrote (without the recall curve)."""
    payload = json.loads(path.read_text())
    metrics = {k: v for k, v in payload.items() if isinstance(v, dict) and k != "ndcg_ci95"}
    return EvaluationReport(
        users=int(payload.get("users", 0)),
        test_users=int(payload.get("test_users", 0)),
        metrics=metrics,
        curve={},
        intervals=payload.get("ndcg_ci95", {}),
        served_kind=str(payload.get("served_kind", "")),
        warnings=list(payload.get("warnings", [])),
    )


def _write(report: EvaluationReport, models: Path, reports: Path) -> None:
    payload = {
        **report.metrics,
        "users": report.users,
        "test_users": report.test_users,
        "served_kind": report.served_kind,
        "training_id": report.training_id,
        "ndcg_ci95": report.intervals,
        "warnings": report.warnings,
    }
    with atomic_path(models / METRICS_FILE) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
    names = list(report.curve)
    ks = sorted(next(iter(report.curve.values())))
    lines = [",".join(["k", *names])]
    lines += [",".join([str(k), *(f"{report.curve[m][k]:.6f}" for m in names)]) for k in ks]
    with atomic_path(reports / CURVE_FILE) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
