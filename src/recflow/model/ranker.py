"""The second stage: LightGBM LambdaRank over each user's candidates (ALS top-N plus popular items).

Rows are the features of `ranker_features`; labels are graded by the strongest action the user took on the
candidate in the target window (0 = none).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np

from recflow.config import RankerSettings
from recflow.model.candidates import CandidateSet
from recflow.model.features import Interactions
from recflow.model.metrics import PAD
from recflow.model.ranker_features import FeatureContext, candidate_features

logger = logging.getLogger(__name__)


def action_grades(weights: np.ndarray) -> np.ndarray:
    """Grade of each action: 1 for the lightest weight up to len(actions) for the heaviest."""
    return np.argsort(np.argsort(weights, kind="stable"), kind="stable").astype(np.int32) + 1


def grade_labels(target: Interactions, row_user: np.ndarray, row_item: np.ndarray, grades: np.ndarray) -> np.ndarray:
    """Label of each row: the grade of the strongest action the user took on the item in the target
    window, 0 when the user did not touch it."""
    labels = np.zeros(len(row_user), dtype=np.int32)
    if len(target) == 0:
        return labels
    n_items = target.n_items
    keys = target.user_idx.astype(np.int64) * n_items + target.item_idx
    grade = grades[target.action_idx]
    order = np.lexsort((grade, keys))  # by key, strongest action last
    keys, grade = keys[order], grade[order]
    last = np.r_[keys[1:] != keys[:-1], True]
    unique_keys, best = keys[last], grade[last]
    row_keys = row_user * n_items + row_item
    pos = np.minimum(np.searchsorted(unique_keys, row_keys), len(unique_keys) - 1)
    found = unique_keys[pos] == row_keys
    labels[found] = best[pos[found]]
    return labels


@dataclass(frozen=True)
class RankerFit:
    booster: lgb.Booster
    best_iteration: int
    validation_ndcg: float
    importances: dict[str, float]
    train_queries: int
    validation_queries: int
    fitted: np.ndarray  # the query ids whose rows the trees were grown on (not the early-stopping ones)
    num_leaves: int = 0


def train_ranker(
    X: np.ndarray,
    labels: np.ndarray,
    query: np.ndarray,
    names: list[str],
    settings: RankerSettings,
    *,
    seed: int = 0,
    weights: np.ndarray | None = None,
    num_leaves: int | None = None,
) -> RankerFit:
    """LambdaRank with early stopping on a held-out 20% of the queries (the same queries for the same seed and
    positives). `query` names each row's query (a user, or a user in one window); rows of one query must be
    contiguous. `num_leaves`: one of `settings.num_leaves` (default the first)."""
    starts = np.flatnonzero(np.r_[True, query[1:] != query[:-1]]) if len(query) else np.zeros(0, dtype=np.int64)
    sizes = np.diff(np.r_[starts, len(query)])
    positive = np.add.reduceat(labels > 0, starts) > 0 if len(starts) else np.zeros(0, dtype=bool)
    query_ids = np.flatnonzero(positive)  # a query without any positive teaches LambdaRank nothing
    if len(query_ids) < 2:
        raise ValueError("fewer than two users have a relevant item among their candidates: cannot train a ranker")
    rng = np.random.default_rng(seed)
    held_out = rng.random(len(query_ids)) < 0.2
    if held_out.all() or not held_out.any():
        held_out[:] = False
        held_out[-1] = True
    train_q, valid_q = query_ids[~held_out], query_ids[held_out]
    num_leaves = num_leaves or settings.num_leaves[0]
    row_query = np.repeat(np.arange(len(starts)), sizes)
    role = np.zeros(len(starts), dtype=np.int8)  # 0 dropped, 1 train, 2 validation
    role[train_q], role[valid_q] = 1, 2
    train_rows = np.flatnonzero(role[row_query] == 1)
    valid_rows = np.flatnonzero(role[row_query] == 2)
    model = lgb.LGBMRanker(
        objective="lambdarank",
        n_estimators=settings.n_estimators,
        learning_rate=settings.learning_rate,
        num_leaves=num_leaves,
        min_child_samples=settings.min_child_samples,
        importance_type="gain",
        random_state=seed,
        n_jobs=0,
        verbose=-1,
    )
    model.fit(
        X[train_rows],
        labels[train_rows],
        sample_weight=None if weights is None else weights[train_rows],
        group=sizes[train_q],
        eval_X=X[valid_rows],
        eval_y=labels[valid_rows],
        eval_group=[sizes[valid_q]],
        eval_at=[10],
        feature_name=names,
        callbacks=[lgb.early_stopping(settings.early_stopping_rounds, verbose=False)],
    )
    importances = dict(zip(names, model.booster_.feature_importance(importance_type="gain").tolist(), strict=True))
    return RankerFit(
        booster=model.booster_,
        best_iteration=int(model.best_iteration_ or settings.n_estimators),
        validation_ndcg=float(model.best_score_["valid_0"]["ndcg@10"]),
        importances=importances,
        train_queries=len(train_q),
        validation_queries=len(valid_q),
        fitted=query[starts[train_q]],
        num_leaves=num_leaves,
    )


def rerank(
    booster: lgb.Booster,
    ctx: FeatureContext,
    users: np.ndarray,
    candidates: CandidateSet,
    k: int,
    *,
    num_threads: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Score every candidate with the ranker and keep each user's top k (PAD where fewer). `num_threads=1`
    suits one request's few hundred rows (LightGBM's thread pool costs ~4 ms per call there); 0: its default."""
    X, _, _ = candidate_features(ctx, users, candidates)
    items = candidates.items
    out_items = np.full((len(users), k), PAD, dtype=np.int64)
    out_scores = np.full((len(users), k), -np.inf, dtype=np.float32)
    if len(X) == 0:
        return out_items, out_scores
    predicted = booster.predict(X, num_iteration=booster.best_iteration or None, num_threads=num_threads)
    valid = items != PAD
    grid = np.full(items.shape, -np.inf)
    grid[valid] = predicted
    top = np.argsort(-grid, axis=1, kind="stable")[:, :k]
    chosen = np.take_along_axis(items, top, axis=1)
    chosen_scores = np.take_along_axis(grid, top, axis=1)
    keep = np.isfinite(chosen_scores)
    out_items[:, : top.shape[1]] = np.where(keep, chosen, PAD)
    out_scores[:, : top.shape[1]] = np.where(keep, chosen_scores, -np.inf)
    return out_items, out_scores
