"""Ranking metrics over full-catalogue recommendations (no sampled negatives).

Recommendations are a users x n matrix of item indices, padded with -1 where a model had fewer items;
the ground truth is a users x items CSR matrix (non-zero = relevant) whose rows align with them.
Relevance is binary: an item the user interacted with in the target window and did not have before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from recflow.model.features import Window

PAD = -1


@dataclass(frozen=True)
class GroundTruth:
    users: np.ndarray  # user indices that are evaluated
    relevant: sp.csr_matrix  # len(users) x n_items, row r belongs to users[r]


def ground_truth(win: Window, history: sp.csr_matrix) -> GroundTruth:
    """Users with history and at least one new item in the target window, and those new items."""
    target = sp.csr_matrix(
        (np.ones(len(win.target), dtype=np.float32), (win.target.user_idx, win.target.item_idx)), shape=history.shape
    )
    return new_items(target, history)


def new_items(target: sp.csr_matrix, history: sp.csr_matrix) -> GroundTruth:
    """Users with history and at least one target item they did not have, and those items (`target` may have
    more columns than `history`: items the model never saw, relevant and never recommended)."""
    target = target.tocsr(copy=True)
    target.sum_duplicates()
    target.data[:] = 1.0
    if target.shape[1] > history.shape[1]:
        history = sp.hstack([history, sp.csr_matrix((history.shape[0], target.shape[1] - history.shape[1]))]).tocsr()
    had = history.copy()
    had.data[:] = 1.0
    new = (target - target.multiply(had)).tocsr()
    new.eliminate_zeros()
    has_history = np.diff(history.indptr) > 0
    users = np.flatnonzero((np.diff(new.indptr) > 0) & has_history)
    return GroundTruth(users=users, relevant=new[users])


def hits(recs: np.ndarray, relevant: sp.csr_matrix) -> np.ndarray:
    """Boolean matrix: hits[r, j] is true when recs[r, j] is relevant for row r."""
    n_items = relevant.shape[1]
    rows = np.repeat(np.arange(len(recs), dtype=np.int64), recs.shape[1])
    rec_keys = rows * n_items + recs.ravel().astype(np.int64)
    coo = relevant.tocoo()
    truth_keys = coo.row.astype(np.int64) * n_items + coo.col.astype(np.int64)
    found = np.isin(rec_keys, truth_keys) & (recs.ravel() != PAD)
    return np.asarray(found.reshape(recs.shape), dtype=bool)


def ranking_metrics(
    recs: np.ndarray, relevant: sp.csr_matrix, *, k: int, recall_k: int, n_catalogue: int
) -> dict[str, float]:
    """NDCG@k, Recall@recall_k, HitRate@k, MAP@k and catalogue coverage@k, averaged over rows."""
    depth = max(k, recall_k)
    if recs.shape[1] < depth:
        raise ValueError(f"need at least {depth} recommendations per user, got {recs.shape[1]}")
    hit = hits(recs[:, :depth], relevant)
    n_relevant = np.diff(relevant.indptr).astype(np.float64)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (hit[:, :k] * discounts).sum(axis=1)
    ideal = np.cumsum(discounts)[np.minimum(n_relevant, k).astype(int) - 1]
    precision_at = np.cumsum(hit[:, :k], axis=1) / np.arange(1, k + 1)
    average_precision = (precision_at * hit[:, :k]).sum(axis=1) / np.minimum(n_relevant, k)
    top = recs[:, :k]
    return {
        f"ndcg@{k}": float(np.mean(dcg / ideal)),
        f"recall@{recall_k}": float(np.mean(hit[:, :recall_k].sum(axis=1) / n_relevant)),
        f"hit_rate@{k}": float(np.mean(hit[:, :k].any(axis=1))),
        f"map@{k}": float(np.mean(average_precision)),
        f"coverage@{k}": float(len(np.unique(top[top != PAD])) / n_catalogue),
    }


def recall_curve(recs: np.ndarray, relevant: sp.csr_matrix, ks: tuple[int, ...]) -> dict[int, float]:
    """Recall@k for each k (capped at the number of recommendations available)."""
    hit = hits(recs, relevant)
    n_relevant = np.diff(relevant.indptr).astype(np.float64)
    cumulative = np.cumsum(hit, axis=1)
    return {k: float(np.mean(cumulative[:, min(k, recs.shape[1]) - 1] / n_relevant)) for k in ks}


def ndcg_per_user(recs: np.ndarray, relevant: sp.csr_matrix, k: int) -> np.ndarray:
    """NDCG@k of each row (binary relevance), the values `ranking_metrics` averages."""
    hit = hits(recs[:, :k], relevant)
    n_relevant = np.diff(relevant.indptr)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(discounts)[np.minimum(n_relevant, k).astype(int) - 1]
    return np.asarray((hit[:, :k] * discounts[: hit.shape[1]]).sum(axis=1) / ideal, dtype=np.float64)


def bootstrap_interval(values: np.ndarray, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean over users."""
    return grouped_bootstrap_interval([np.asarray(values)], lambda means: float(means[0]), resamples, seed)


def grouped_bootstrap_interval(
    samples: Sequence[np.ndarray], combine: Callable[[np.ndarray], float], resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of `combine(per-sample means)`: users are resampled within each sample
    (a validation fold), so the interval is of the same statistic that is reported (e.g. a mean over protocols)."""
    arrays = [np.asarray(v, dtype=np.float64) for v in samples]
    if not arrays or any(len(a) == 0 for a in arrays):
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    stats = np.array(
        [combine(np.array([a[rng.integers(0, len(a), len(a))].mean() for a in arrays])) for _ in range(resamples)]
    )
    return (round(float(np.percentile(stats, 2.5)), 4), round(float(np.percentile(stats, 97.5)), 4))


def paired_standard_error(first: np.ndarray, second: np.ndarray) -> float:
    """The standard error of the mean of `first - second`, the same users judging both (0 for fewer than two):
    the selection's one-standard-error rule and the promotion gate both measure with it."""
    difference = np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)
    if len(difference) < 2:
        return 0.0
    return float(np.std(difference, ddof=1) / np.sqrt(len(difference)))
