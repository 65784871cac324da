"""The second stage: LightGBM LambdaRank over the top-N ALS candidates of each user.

Features of a (user, candidate) pair come only from history before the user's reference time, so a ranker
trained on one window can be applied to the next without leakage. Labels are graded by the strongest
action the user took on the candidate in the target window (0 = none).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path

import lightgbm as lgb
import numpy as np

from recflow.config import RankerSettings
from recflow.features import SECONDS_PER_DAY, Interactions
from recflow.metrics import PAD

logger = logging.getLogger(__name__)

_TS_BITS = 32


@dataclass(frozen=True)
class FeatureContext:
    """Item and user statistics of a history, as of each user's reference time, to compute ranker features."""

    ref_time: np.ndarray  # float64 per user
    t0: int  # epoch seconds subtracted from times in item_keys
    item_keys: np.ndarray  # int64, sorted: item_idx << 32 | (ts - t0)
    item_first_ts: np.ndarray  # float64 per item, inf when never seen
    item_action_counts: np.ndarray  # float32, items x actions
    user_last_ts: np.ndarray  # float64 per user, nan when never seen
    user_n_items: np.ndarray  # float32 per user
    user_action_counts: np.ndarray  # float32, users x actions
    recent_items: np.ndarray  # int64, users x recent (most recent first), PAD when fewer
    item_vectors: np.ndarray  # float32, items x factors, unit length (zero rows stay zero)
    windows_days: tuple[float, ...]

    def save(self, path: Path) -> None:
        arrays = {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> FeatureContext:
        with np.load(path) as data:
            values = {f.name: data[f.name] for f in fields(cls)}
        values["t0"] = int(values["t0"])
        values["windows_days"] = tuple(float(w) for w in values["windows_days"])
        return cls(**values)


def build_context(
    history: Interactions, ref_time: np.ndarray, item_factors: np.ndarray, settings: RankerSettings
) -> FeatureContext:
    n_users, n_items, n_actions = history.n_users, history.n_items, len(history.actions)
    t0 = int(history.ts.min()) if len(history) else 0
    keys = (history.item_idx.astype(np.int64) << _TS_BITS) | (history.ts - t0).astype(np.int64)
    first = np.full(n_items, np.inf)
    np.minimum.at(first, history.item_idx, history.ts.astype(np.float64))
    item_actions = np.zeros((n_items, n_actions), dtype=np.float32)
    np.add.at(item_actions, (history.item_idx, history.action_idx), 1.0)
    user_actions = np.zeros((n_users, n_actions), dtype=np.float32)
    np.add.at(user_actions, (history.user_idx, history.action_idx), 1.0)
    last = np.full(n_users, -np.inf)
    np.maximum.at(last, history.user_idx, history.ts.astype(np.float64))
    last[np.isinf(last)] = np.nan
    pairs = np.unique((history.user_idx.astype(np.int64) << _TS_BITS) | history.item_idx)
    n_items_per_user = np.bincount((pairs >> _TS_BITS).astype(np.int64), minlength=n_users).astype(np.float32)
    norms = np.linalg.norm(item_factors, axis=1, keepdims=True)
    unit = np.divide(item_factors, norms, out=np.zeros_like(item_factors), where=norms > 0).astype(np.float32)
    return FeatureContext(
        ref_time=ref_time.astype(np.float64),
        t0=t0,
        item_keys=np.sort(keys),
        item_first_ts=first,
        item_action_counts=item_actions,
        user_last_ts=last,
        user_n_items=n_items_per_user,
        user_action_counts=user_actions,
        recent_items=_recent_items(history, settings.recent_items),
        item_vectors=unit,
        windows_days=tuple(settings.popularity_windows_days),
    )


def _recent_items(history: Interactions, k: int) -> np.ndarray:
    """Each user's last k items (most recent first), from a history sorted by time."""
    recent = np.full((history.n_users, k), PAD, dtype=np.int64)
    order = np.argsort(history.user_idx, kind="stable")  # per user, still in time order
    users = history.user_idx[order]
    counts = np.bincount(users, minlength=history.n_users)
    ends = np.cumsum(counts)
    from_end = ends[users] - np.arange(len(order))  # 1 = the user's last event
    keep = from_end <= k
    recent[users[keep], from_end[keep] - 1] = history.item_idx[order][keep]
    return recent


def feature_names(actions: tuple[str, ...], windows_days: tuple[float, ...]) -> list[str]:
    windows = [f"item_pop_{w:g}d" for w in windows_days]
    return [
        "als_score",
        "als_rank",
        "als_gap_to_top",
        *windows,
        "item_pop_trend",
        "item_pop_all",
        "item_age_days",
        *[f"item_n_{a}" for a in actions],
        "user_n_events",
        "user_n_items",
        "user_recency_days",
        *[f"user_n_{a}" for a in actions],
        "sim_last_item",
        "sim_recent_max",
        "sim_recent_mean",
    ]


def candidate_features(
    ctx: FeatureContext, users: np.ndarray, items: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of every non-padded (user, candidate) pair of a users x n candidate matrix.

    Returns (X, row_user, row_item): one row per candidate, grouped by user in input order.
    """
    valid = items != PAD
    rank = np.broadcast_to(np.arange(items.shape[1], dtype=np.float32), items.shape)[valid]
    top = np.where(valid, scores, -np.inf).max(axis=1, keepdims=True)
    gap = np.broadcast_to(top, items.shape)[valid] - scores[valid]
    row_user = np.broadcast_to(np.asarray(users)[:, None], items.shape)[valid].astype(np.int64)
    row_item = items[valid].astype(np.int64)
    ref = ctx.ref_time[row_user]

    base = row_item << _TS_BITS
    rel_ref = np.clip(ref - ctx.t0, 0, 2**_TS_BITS - 1).astype(np.int64)
    upto = np.searchsorted(ctx.item_keys, base | rel_ref, side="left")
    start = np.searchsorted(ctx.item_keys, base, side="left")
    windows = []
    for days in ctx.windows_days:
        since = np.clip(ref - days * SECONDS_PER_DAY - ctx.t0, 0, 2**_TS_BITS - 1).astype(np.int64)
        windows.append(upto - np.searchsorted(ctx.item_keys, base | since, side="left"))
    short_rate = windows[0] / ctx.windows_days[0]
    long_rate = windows[-1] / ctx.windows_days[-1]
    trend = (short_rate + 1e-3) / (long_rate + 1e-3)
    age = (ref - ctx.item_first_ts[row_item]) / SECONDS_PER_DAY
    age[~np.isfinite(age)] = np.nan

    user_actions = ctx.user_action_counts[row_user]
    recency = (ref - ctx.user_last_ts[row_user]) / SECONDS_PER_DAY

    recent = ctx.recent_items[row_user]
    cand_vec = ctx.item_vectors[row_item]
    recent_vec = ctx.item_vectors[np.where(recent == PAD, 0, recent)]
    sims = np.einsum("rf,rkf->rk", cand_vec, recent_vec)
    sims[recent == PAD] = np.nan
    has_recent = (recent != PAD).any(axis=1)
    with np.errstate(invalid="ignore"):
        sim_max = np.where(has_recent, np.nanmax(np.where(recent == PAD, -np.inf, sims), axis=1), np.nan)
        sim_mean = np.where(has_recent, np.nansum(sims, axis=1) / np.maximum((recent != PAD).sum(axis=1), 1), np.nan)

    columns = [
        scores[valid],
        rank,
        gap,
        *windows,
        trend,
        upto - start,
        age,
        *ctx.item_action_counts[row_item].T,
        user_actions.sum(axis=1),
        ctx.user_n_items[row_user],
        recency,
        *user_actions.T,
        sims[:, 0],
        sim_max,
        sim_mean,
    ]
    X = np.column_stack([np.asarray(c, dtype=np.float32) for c in columns])
    return X, row_user, row_item


def action_grades(weights: np.ndarray) -> np.ndarray:
    """Grade of each action: 1 for the lightest weight up to len(actions) for the heaviest."""
    return np.argsort(np.argsort(weights, kind="stable"), kind="stable").astype(np.int32) + 1


def grade_labels(
    target: Interactions, row_user: np.ndarray, row_item: np.ndarray, grades: np.ndarray
) -> np.ndarray:
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


def train_ranker(
    X: np.ndarray,
    labels: np.ndarray,
    row_user: np.ndarray,
    names: list[str],
    settings: RankerSettings,
    *,
    seed: int = 0,
) -> RankerFit:
    """LambdaRank with early stopping on a held-out 20% of the queries (users). Rows must be grouped by user."""
    boundaries = np.flatnonzero(np.diff(row_user)) + 1
    starts = np.concatenate(([0], boundaries))
    sizes = np.diff(np.concatenate((starts, [len(row_user)])))
    positive = np.add.reduceat(labels > 0, starts) > 0 if len(starts) else np.zeros(0, dtype=bool)
    query_ids = np.flatnonzero(positive)  # a query without any positive teaches LambdaRank nothing
    if len(query_ids) < 2:
        raise ValueError("fewer than two users have a relevant item among their candidates: cannot train a ranker")
    rng = np.random.default_rng(seed)
    held_out = rng.random(len(query_ids)) < 0.2
    if held_out.all() or not held_out.any():
        held_out[:] = False
        held_out[-1] = True

    def rows_of(queries: np.ndarray) -> np.ndarray:
        return np.concatenate([np.arange(starts[q], starts[q] + sizes[q]) for q in queries])

    train_q, valid_q = query_ids[~held_out], query_ids[held_out]
    train_rows, valid_rows = rows_of(train_q), rows_of(valid_q)
    model = lgb.LGBMRanker(
        objective="lambdarank",
        n_estimators=settings.n_estimators,
        learning_rate=settings.learning_rate,
        num_leaves=settings.num_leaves,
        min_child_samples=settings.min_child_samples,
        importance_type="gain",
        random_state=seed,
        n_jobs=0,
        verbose=-1,
    )
    model.fit(
        X[train_rows],
        labels[train_rows],
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
    )


def rerank(
    booster: lgb.Booster, ctx: FeatureContext, users: np.ndarray, items: np.ndarray, scores: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Score every candidate with the ranker and keep each user's top k (PAD where fewer)."""
    X, _, _ = candidate_features(ctx, users, items, scores)
    out_items = np.full((len(users), k), PAD, dtype=np.int64)
    out_scores = np.full((len(users), k), -np.inf, dtype=np.float32)
    if len(X) == 0:
        return out_items, out_scores
    predicted = booster.predict(X, num_iteration=booster.best_iteration or None)
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
