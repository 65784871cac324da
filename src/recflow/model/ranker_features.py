"""The ranker's features: what is known about a (user, candidate) pair as of the user's reference time.

`build_context` summarises a history (item popularity over time, item and user action counts, each user's
recent items, item-to-item transitions, unit item vectors); `candidate_features` turns a candidate set into one
row per (user, candidate). Everything comes from the window's history, never its target (the time-windowed
popularity counts only events before the user's reference time), so a ranker trained on one window can be
applied to the next without leakage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from recflow.config import RankerSettings
from recflow.model.candidates import SOURCE_ALS, SOURCE_ITEM_ITEM, SOURCE_POPULAR, CandidateSet
from recflow.model.features import SECONDS_PER_DAY, Interactions
from recflow.model.metrics import PAD

_TS_BITS = 32
_TS_MASK = 2**_TS_BITS - 1
BATCH_USERS = 4096  # users whose candidate vectors are in memory at once


@dataclass(frozen=True)
class FeatureContext:
    """Item and user statistics of a history, as of each user's reference time, to compute ranker features."""

    ref_time: np.ndarray  # float64 per user
    t0: int  # epoch seconds subtracted from times in item_keys
    item_keys: np.ndarray  # int64, sorted: item_idx << 32 | (ts - t0)
    item_first_ts: np.ndarray  # float64 per item, inf when never seen
    item_action_counts: np.ndarray  # float32, items x actions
    transition_keys: np.ndarray  # int64, sorted: a * n_items + b for item b right after item a in a user's history
    transition_counts: np.ndarray  # float32, times each transition occurred
    item_out_counts: np.ndarray  # float32 per item: transitions leaving it
    user_last_ts: np.ndarray  # float64 per user, nan when never seen
    user_n_items: np.ndarray  # float32 per user
    user_action_counts: np.ndarray  # float32, users x actions
    recent_items: np.ndarray  # int64, users x recent (most recent first), PAD when fewer
    item_vectors: np.ndarray  # float32, items x factors, unit length (zero rows stay zero)
    windows_days: tuple[float, ...]

    def save(self, path: Path | BinaryIO) -> None:
        arrays: dict[str, Any] = {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}
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
    item_keys = np.sort((history.item_idx.astype(np.int64) << _TS_BITS) | (history.ts - t0))
    key_items = item_keys >> _TS_BITS
    firsts = np.flatnonzero(np.r_[True, key_items[1:] != key_items[:-1]]) if len(item_keys) else item_keys
    first = np.full(n_items, np.inf)
    first[key_items[firsts]] = (item_keys[firsts] & _TS_MASK) + t0
    item_actions = np.bincount(
        history.item_idx.astype(np.int64) * n_actions + history.action_idx, minlength=n_items * n_actions
    )
    user_actions = np.bincount(
        history.user_idx.astype(np.int64) * n_actions + history.action_idx, minlength=n_users * n_actions
    )
    by_user = np.argsort(history.user_idx, kind="stable")  # per user, still in time order
    users, items = history.user_idx[by_user], history.item_idx[by_user].astype(np.int64)
    last_of_user = np.r_[users[1:] != users[:-1], True] if len(users) else np.zeros(0, dtype=bool)
    last = np.full(n_users, np.nan)
    last[users[last_of_user]] = history.ts[by_user][last_of_user]
    pairs = _unique_counts((users.astype(np.int64) << _TS_BITS) | items)[0]
    n_items_per_user = np.bincount(pairs >> _TS_BITS, minlength=n_users).astype(np.float32)
    norms = np.linalg.norm(item_factors, axis=1, keepdims=True)
    unit = np.divide(item_factors, norms, out=np.zeros_like(item_factors), where=norms > 0).astype(np.float32)
    same_user = ~last_of_user[:-1]
    moves = (items[:-1] * n_items + items[1:])[same_user & (items[:-1] != items[1:])]
    transition_keys, transition_counts = _unique_counts(moves)
    out_counts = np.bincount(transition_keys // n_items, weights=transition_counts, minlength=n_items)
    return FeatureContext(
        ref_time=ref_time.astype(np.float64),
        t0=t0,
        item_keys=item_keys,
        item_first_ts=first,
        item_action_counts=item_actions.reshape(n_items, n_actions).astype(np.float32),
        transition_keys=transition_keys,
        transition_counts=transition_counts.astype(np.float32),
        item_out_counts=out_counts.astype(np.float32),
        user_last_ts=last,
        user_n_items=n_items_per_user,
        user_action_counts=user_actions.reshape(n_users, n_actions).astype(np.float32),
        recent_items=_recent_items(users, items, n_users, settings.recent_items),
        item_vectors=unit,
        windows_days=tuple(settings.popularity_windows_days),
    )


def with_events(
    ctx: FeatureContext, item_idx: np.ndarray, action_idx: np.ndarray, ts: np.ndarray, moves: np.ndarray
) -> FeatureContext:
    """The context's item statistics with events that came after it: what `build_context` gives on the history
    plus these events when each user's new events follow their history (the service's events since the model).
    `moves` are the new transitions as `a * n_items + b` keys (item b right after item a, a != b); the user
    statistics and the reference times are left as they are (the caller sets them per user)."""
    if len(item_idx) == 0:
        return ctx
    n_items, n_actions = ctx.item_action_counts.shape
    rel = np.clip(np.asarray(ts, dtype=np.int64) - ctx.t0, 0, _TS_MASK)
    keys = np.sort((np.asarray(item_idx, dtype=np.int64) << _TS_BITS) | rel)
    first = ctx.item_first_ts.copy()
    np.minimum.at(first, item_idx, np.asarray(ts, dtype=np.float64))
    counts = np.bincount(
        np.asarray(item_idx, dtype=np.int64) * n_actions + action_idx, minlength=n_items * n_actions
    ).reshape(n_items, n_actions)
    moved, times = _unique_counts(np.asarray(moves, dtype=np.int64))
    at = np.searchsorted(ctx.transition_keys, moved)
    known = at < len(ctx.transition_keys)
    known[known] = ctx.transition_keys[at[known]] == moved[known]
    transition_counts = ctx.transition_counts.copy()
    transition_counts[at[known]] += times[known]
    return replace(
        ctx,
        item_keys=np.insert(ctx.item_keys, np.searchsorted(ctx.item_keys, keys), keys),
        item_first_ts=first,
        item_action_counts=ctx.item_action_counts + counts.astype(np.float32),
        transition_keys=np.insert(ctx.transition_keys, at[~known], moved[~known]),
        transition_counts=np.insert(transition_counts, at[~known], times[~known].astype(np.float32)),
        item_out_counts=ctx.item_out_counts
        + np.bincount(np.asarray(moves, dtype=np.int64) // n_items, minlength=n_items).astype(np.float32),
    )


def following(previous: np.ndarray, sequences: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """The transitions (keys `a * n_items + b`, a != b) that new events add to a history: each user's new items
    in time order, after the user's last item in the history (`previous`, PAD for none), as `build_context`
    counts them."""
    moves = [np.zeros(0, dtype=np.int64)]
    for last, items in zip(previous, sequences, strict=True):
        chain = np.asarray(items if last == PAD else np.r_[last, items], dtype=np.int64)
        moves.append((chain[:-1] * n_items + chain[1:])[chain[:-1] != chain[1:]])
    return np.concatenate(moves)


def _unique_counts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct keys and how often each occurs."""
    keys = np.sort(keys)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, dtype=np.int64)
    return keys[starts], np.diff(np.r_[starts, len(keys)])


def _recent_items(users: np.ndarray, items: np.ndarray, n_users: int, k: int) -> np.ndarray:
    """Each user's last k items (most recent first), from events sorted by user and then time."""
    recent = np.full((n_users, k), PAD, dtype=np.int64)
    ends = np.cumsum(np.bincount(users, minlength=n_users))
    from_end = ends[users] - np.arange(len(users))  # 1 = the user's last event
    keep = from_end <= k
    recent[users[keep], from_end[keep] - 1] = items[keep]
    return recent


def feature_names(actions: tuple[str, ...], windows_days: tuple[float, ...]) -> list[str]:
    windows = [f"item_pop_{w:g}d" for w in windows_days]
    return [
        "als_score",
        "als_rank",
        "als_gap_to_top",
        "from_als",
        "from_popular",
        "from_item_item",
        "item_item_score",
        "item_item_rank",
        *windows,
        "item_pop_at_user_last",
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
        "next_after_last",
        "next_after_recent",
    ]


def candidate_features(
    ctx: FeatureContext, users: np.ndarray, candidates: CandidateSet
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of every non-padded (user, candidate) pair of a users x width candidate set.

    Returns (X, row_user, row_item): one row per candidate, grouped by user in input order.
    """
    users = np.asarray(users)
    items, all_scores = candidates.items, candidates.scores
    valid = items != PAD
    masked = np.where(valid, all_scores, -np.inf)
    ranks = _row_ranks(masked)
    row_user = np.broadcast_to(users[:, None], items.shape)[valid].astype(np.int64)
    row_item = items[valid].astype(np.int64)
    sources = candidates.sources[valid]
    ref = ctx.ref_time[row_user]
    pop_windows, pop_all = _popularity(ctx, row_item, ref)
    user_last = ctx.user_last_ts[row_user]
    # popularity (longest window) as of the user's own last event: what was current when a dormant user left
    at_user_last = _popularity(ctx, row_item, np.where(np.isfinite(user_last), user_last + 1.0, ref))[0][-1]
    short_rate = pop_windows[0] / ctx.windows_days[0]
    long_rate = pop_windows[-1] / ctx.windows_days[-1]
    age = (ref - ctx.item_first_ts[row_item]) / SECONDS_PER_DAY
    age[~np.isfinite(age)] = np.nan
    user_actions = ctx.user_action_counts[row_user]
    similarity = _recent_similarity(ctx, users, items)[valid]  # rows x 5
    item_item_share, item_item_rank = _relative(candidates.item_item, valid)

    columns = [
        all_scores[valid],
        ranks[valid],
        masked.max(axis=1, keepdims=True).repeat(items.shape[1], axis=1)[valid] - all_scores[valid],
        (sources & SOURCE_ALS) > 0,
        (sources & SOURCE_POPULAR) > 0,
        (sources & SOURCE_ITEM_ITEM) > 0,
        item_item_share,
        item_item_rank,
        *pop_windows,
        at_user_last,
        (short_rate + 1e-3) / (long_rate + 1e-3),
        pop_all,
        age,
        *ctx.item_action_counts[row_item].T,
        user_actions.sum(axis=1),
        ctx.user_n_items[row_user],
        (ref - ctx.user_last_ts[row_user]) / SECONDS_PER_DAY,
        *user_actions.T,
        *similarity.T,
    ]
    X = np.empty((len(row_user), len(columns)), dtype=np.float32)
    for j, column in enumerate(columns):
        X[:, j] = column
    return X, row_user, row_item


def _relative(scores: np.ndarray | None, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each candidate's item-item score as a share of its user's highest, and its rank among the user's candidates
    (0: the highest), nan without one. Free of the scores' scale, which grows with the items in the user's row: a
    ranker trained on a validation fold's thinner rows then applies to the model fitted on all events (on ml-1m the
    raw score's ranker, trained on folds, fell below its own item-item candidates once served)."""
    n = int(valid.sum())
    if scores is None:
        return np.full(n, np.nan, dtype=np.float32), np.full(n, np.nan, dtype=np.float32)
    present = valid & np.isfinite(scores)
    masked = np.where(present, scores, -np.inf)
    top = masked.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        share = np.where(present & (top > 0), scores / np.where(top > 0, top, 1.0), np.nan)
    return share[valid].astype(np.float32), np.where(present, _row_ranks(masked), np.nan)[valid].astype(np.float32)


def _row_ranks(scores: np.ndarray) -> np.ndarray:
    """Each entry's rank in its row, 0 for the highest (ties in column order)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty(scores.shape, dtype=np.float32)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(scores.shape[1], dtype=np.float32), scores.shape), 1)
    return ranks


def _popularity(ctx: FeatureContext, row_item: np.ndarray, ref: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Events of each row's item in each popularity window before the row's reference time, and in all time
    before it. Counted once per distinct (item, reference time): with a global split that is once per item."""
    rel_ref = np.clip(ref - ctx.t0, 0, _TS_MASK).astype(np.int64)
    keys, inverse = np.unique((row_item << _TS_BITS) | rel_ref, return_inverse=True)
    base = (keys >> _TS_BITS) << _TS_BITS
    upto = np.searchsorted(ctx.item_keys, keys, side="left")
    windows = []
    for days in ctx.windows_days:
        since = np.clip((keys & _TS_MASK) - int(days * SECONDS_PER_DAY), 0, None)
        windows.append((upto - np.searchsorted(ctx.item_keys, base | since, side="left"))[inverse])
    return windows, (upto - np.searchsorted(ctx.item_keys, base, side="left"))[inverse]


def _recent_similarity(ctx: FeatureContext, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """users x width x 5: cosine similarity of each candidate to the user's last item, max and mean over the
    user's recent items, and how often the candidate followed the last item / the recent items (as a share of
    the transitions leaving them). Computed in user batches to bound memory."""
    out = np.full((*items.shape, 5), np.nan, dtype=np.float32)
    n_items = len(ctx.item_out_counts)
    for start in range(0, len(users), BATCH_USERS):
        batch = slice(start, start + BATCH_USERS)
        cand = np.where(items[batch] == PAD, 0, items[batch])
        recent = ctx.recent_items[users[batch]]
        has = recent != PAD
        safe_recent = np.where(has, recent, 0)
        sims = np.einsum("uwf,ukf->uwk", ctx.item_vectors[cand], ctx.item_vectors[safe_recent])
        sims = np.where(has[:, None, :], sims, np.nan)
        any_recent = has.any(axis=1)[:, None]
        with np.errstate(invalid="ignore"):
            block = out[batch]
            block[..., 0] = sims[..., 0]
            block[..., 1] = np.where(any_recent, np.max(np.where(has[:, None, :], sims, -np.inf), axis=2), np.nan)
            block[..., 2] = np.where(
                any_recent, np.nansum(sims, axis=2) / np.maximum(has.sum(axis=1), 1)[:, None], np.nan
            )
        keys = np.where(has[:, None, :], safe_recent[:, None, :] * n_items + cand[:, :, None], -1)
        followed = _lookup(ctx.transition_keys, ctx.transition_counts, keys)
        leaving = (ctx.item_out_counts[safe_recent] * has)[:, None, :]
        out[batch, :, 3] = followed[..., 0] / np.maximum(leaving[..., 0], 1.0)
        out[batch, :, 4] = followed.sum(axis=2) / np.maximum(leaving.sum(axis=2), 1.0)
    return out


def _lookup(sorted_keys: np.ndarray, values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """values[i] where sorted_keys[i] == key, 0 where the key is absent."""
    if len(sorted_keys) == 0:
        return np.zeros(keys.shape, dtype=np.float32)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == keys, values[pos], 0.0).astype(np.float32)
