"""The promotion gate: versions' backtest bundles scored on the same, current test window, and the rule.

`recflow evaluate` scores the backtest bundle trained from the current features on their test window. The
gate has to compare that candidate with the version in production, which was trained (and evaluated) on an
older window, on the *current* one. A bundle trained from older features has its own user and item index, so
the current window is mapped into each bundle's index by external id:

- users: only test users every bundle knows are scored (the same users for every bundle);
- relevant items: the items new to each user in the current test window (`metrics.ground_truth`), whether or
  not a bundle knows them (an item a bundle never saw is a miss for it, as it would be in production);
- what a user already had: everything before the current test window. A bundle whose id maps differ from the
  current features is given that history (in its own index) in place of the older one it was trained with, so
  it excludes the same items the candidate excludes, as the service does with the events it received since.
  Its popular-item candidates then come from that history too (fresher than production's own: if anything,
  this favours production). Its user vectors, item factors, ranker and ranker features stay as trained: what
  it learnt ends where its training data ended, as it does in production.

Both bundles are then scored by the same code as `recflow evaluate` (`ModelBundle.recommend`, then
`metrics.ranking_metrics`): a bundle whose id maps equal the current features' scores exactly as in
`models/metrics.json` when every test user is known to all bundles.

The rule is the train stage's (selection.py): the same users judge both, so the difference is paired, and a
shortfall within one standard error of that difference is one the window cannot tell from none. The candidate is
promoted unless production is ahead by more than one standard error and by more than `registry.tolerance` (which
decides on windows so large that the standard error is smaller).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from recflow.config import Settings
from recflow.errors import EmptyDataError
from recflow.model.bundle import ModelBundle
from recflow.model.evaluate import sample_users, test_window
from recflow.model.features import action_weights, confidence_matrix
from recflow.model.metrics import (
    PAD,
    GroundTruth,
    ground_truth,
    ndcg_per_user,
    paired_standard_error,
    ranking_metrics,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowScores:
    """Offline metrics of each bundle (in the order given) on the same users of the current test window."""

    metrics: list[dict[str, float]]
    ndcg: list[np.ndarray]  # NDCG@k of each scored user, per bundle (the same users in the same order)
    users: int  # test users scored (known to every bundle)
    test_users: int  # test users in the current window (warm, with an item new to them)


@dataclass(frozen=True)
class Verdict:
    """The gate's answer for one candidate against production, both scored on the current test window."""

    passed: bool  # candidate >= production - max(tolerance, standard_error)
    metric: str
    candidate: float
    production: float
    users: int
    standard_error: float  # of the paired per-user difference production - candidate


def gate_metric(settings: Settings) -> str:
    """The metric the gate compares: NDCG at `evaluate.k`."""
    return f"ndcg@{settings.evaluate.k}"


def judge(candidate_backtest: Path, production_backtest: Path, features: Path, settings: Settings) -> Verdict:
    """Score both backtest bundles on the test window of `features`; the candidate passes when its metric is at
    least production's minus the larger of `registry.tolerance` and one standard error of the paired difference."""
    bundles = [ModelBundle.load(candidate_backtest), ModelBundle.load(production_backtest)]
    scores = score_on_current_window(bundles, features, settings)
    metric = gate_metric(settings)
    candidate, production = scores.metrics[0][metric], scores.metrics[1][metric]
    error = paired_standard_error(scores.ndcg[1], scores.ndcg[0])
    passed = candidate >= production - max(settings.registry.tolerance, error)
    return Verdict(passed=passed, metric=metric, candidate=candidate, production=production, users=scores.users,
                   standard_error=error)  # fmt: skip


def score_on_current_window(bundles: Sequence[ModelBundle], features: Path, settings: Settings) -> WindowScores:
    """Score every bundle's served model on the test window of `features`, on the users every bundle knows."""
    inter, test = test_window(features)
    weights = action_weights(settings, inter.actions)
    history = confidence_matrix(test.history, weights, None)
    truth = ground_truth(test, history)
    user_maps = [_index_map(inter.user_ids, bundle.user_ids) for bundle in bundles]
    known = np.all([m[truth.users] >= 0 for m in user_maps], axis=0) if bundles else np.ones(0, dtype=bool)
    users, relevant = truth.users[known], truth.relevant[np.flatnonzero(known)]
    if len(users) == 0:
        raise EmptyDataError(
            f"no test user in {features} is known to every version compared, so the gate cannot compare them: "
            "rebuild features from the event store (recflow features) or deploy with --force"
        )
    conf = settings.evaluate
    sample = sample_users(GroundTruth(users, relevant), conf)  # the same fixed sample as `recflow evaluate`
    users, relevant = sample.users, sample.relevant
    depth = max(conf.k, conf.recall_k)
    n_catalogue = int((np.asarray(history.getnnz(axis=0)) > 0).sum())
    scores, per_user = [], []
    for bundle, user_map in zip(bundles, user_maps, strict=True):
        item_map = _index_map(inter.item_ids, bundle.item_ids)  # current item -> bundle item (-1: unknown)
        if _same_ids(bundle, inter.user_ids, inter.item_ids):
            recs, _ = bundle.recommend(users, depth)
        else:
            own = confidence_matrix(test.history, weights, bundle.half_life_days)  # weighted as the bundle weighs
            adapted = dataclasses.replace(bundle, history=_remap(own, user_map, item_map, bundle))
            bundle_recs, _ = adapted.recommend(user_map[users], depth)
            back = np.full(len(bundle.item_ids) + 1, PAD, dtype=np.int64)  # bundle item -> current item; PAD -> PAD
            known_items = np.flatnonzero(item_map >= 0)
            back[item_map[known_items]] = known_items
            recs = back[bundle_recs]
        scores.append(ranking_metrics(recs, relevant, k=conf.k, recall_k=conf.recall_k, n_catalogue=n_catalogue))
        per_user.append(ndcg_per_user(recs, relevant, conf.k))
        logger.info("gate: %s", scores[-1])
    return WindowScores(metrics=scores, ndcg=per_user, users=len(users), test_users=len(truth.users))


def _index_map(current_ids: np.ndarray, bundle_ids: np.ndarray) -> np.ndarray:
    """For each current index, the bundle's index of the same external id, or -1."""
    index = {value: i for i, value in enumerate(bundle_ids)}
    return np.fromiter((index.get(value, -1) for value in current_ids), dtype=np.int64, count=len(current_ids))


def _same_ids(bundle: ModelBundle, user_ids: np.ndarray, item_ids: np.ndarray) -> bool:
    return (
        len(bundle.user_ids) == len(user_ids)
        and len(bundle.item_ids) == len(item_ids)
        and bool(np.all(bundle.user_ids == user_ids))
        and bool(np.all(bundle.item_ids == item_ids))
    )


def _remap(history: sp.csr_matrix, user_map: np.ndarray, item_map: np.ndarray, bundle: ModelBundle) -> sp.csr_matrix:
    """The current history in the bundle's index; users and items the bundle does not know are left out."""
    coo = history.tocoo()
    rows, cols = user_map[coo.row], item_map[coo.col]
    keep = (rows >= 0) & (cols >= 0)
    shape = (len(bundle.user_ids), len(bundle.item_ids))
    return sp.csr_matrix((coo.data[keep], (rows[keep], cols[keep])), shape=shape)
