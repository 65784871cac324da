"""The one scoring function: a model's top-k for users as they are at one moment.

Batch `recflow recommend`, `recflow evaluate` (backtest and `--holdout`), the train stage's model selection
and the HTTP service all call `score_users`. What they hand it is the users' state at the moment of the
answer: each user's confidence row (what they had, weighted as training weighs it), their ALS vector (trained,
or folded in from the row), and the ranker's feature context computed as of that moment. The model kinds:

    popularity   the most popular items (in the window chosen on validation) the user has not had
    item_knn     row @ S, S the BM25 item-kNN similarity (implicit)
    ease         row @ B, B the EASE item-item weights
    als          user vector . item factors
    als_ranker   ALS top-N, plus popular and item-item candidates, reranked by the LightGBM ranker

Items the user had (non-zero in the row, plus `seen`) and items without any history are never returned.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import scipy.sparse as sp
from implicit.cpu.topk import topk

from recflow.model.candidates import SOURCE_ALS, SOURCE_ITEM_ITEM, SOURCE_POPULAR, CandidateSet, clean_topk
from recflow.model.metrics import PAD

BATCH_USERS = 1024  # most users scored at once (a users x items float32 block)
# users x items cells of one block (float32 scores 128 MB, the top-k's int64 indices 256 MB): a wide catalogue is
# scored fewer users at a time, so memory does not grow with the catalogue
BLOCK_CELLS = 1 << 25
# users x items below which ALS's top-k comes from numpy's block (one request's user: implicit's exclusion matrix
# costs 0.1 ms more at 1.7k items); above it implicit's top-k is faster (2.4x at 1,024 users x 50k items)
ALS_BLOCK_CELLS = 1 << 20
# users x items from which a block's top-k is partitioned in two halves side by side (never one request's user)
PARALLEL_CELLS = 1 << 22
POPULARITY_TIE = 1e-6  # popularity breaks ties of item-item scores (a user whose items have no neighbours)

KIND_POPULARITY, KIND_ITEM_KNN, KIND_EASE, KIND_ALS, KIND_TWO_STAGE = (
    "popularity",
    "item_knn",
    "ease",
    "als",
    "als_ranker",
)
ITEM_ITEM_KINDS = (KIND_ITEM_KNN, KIND_EASE)


class ScoringModel(Protocol):
    """What scoring needs of a trained model (a ModelBundle is one)."""

    kind: str
    item_factors: np.ndarray  # items x factors (ALS)
    popularity: np.ndarray  # float32 per item, as of the model's moment; 0 = no history (never recommended)
    item_item: sp.csr_matrix | np.ndarray | None  # items x items weights of the item-item model, when fitted
    n_candidates: int
    n_popular: int
    n_item_item: int

    @property
    def popular_order(self) -> np.ndarray: ...  # items with any history, most popular first (`popular_order`)


def batch_users(n_items: int) -> int:
    """Users scored at once: BATCH_USERS, fewer where their users x items block would pass BLOCK_CELLS."""
    return max(1, min(BATCH_USERS, BLOCK_CELLS // max(n_items, 1)))


def popular_order(popularity: np.ndarray) -> np.ndarray:
    """Items with any history, most popular first (stable: ties keep item order)."""
    known = np.flatnonzero(popularity > 0)
    return known[np.argsort(-popularity[known], kind="stable")]


def _top(scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise indices of the n highest finite scores, best first; PAD / -inf where fewer."""
    n_rows, n_items = scores.shape
    n = min(n, n_items)
    items = np.full((n_rows, n), PAD, dtype=np.int64)
    values = np.full((n_rows, n), -np.inf, dtype=np.float32)
    if n == 0 or n_rows == 0:
        return items, values
    part = _partitioned(scores, n_items - n)
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1)
    top_scores = np.take_along_axis(part_scores, order, axis=1)
    keep = np.isfinite(top_scores)
    items[:] = np.where(keep, top, PAD)
    values[:] = np.where(keep, top_scores, -np.inf)
    return items, values


def _partitioned(scores: np.ndarray, kth: int) -> np.ndarray:
    """Each row's columns from `kth` on of `np.argpartition(scores, kth, axis=1)` (no negated copy of the block).
    numpy's partition releases the GIL and runs on one core: a block of PARALLEL_CELLS or more is split in row
    halves partitioned side by side (1.5x faster on 2 cores for 671 x 50k cells; the same answer)."""
    if scores.size < PARALLEL_CELLS or len(scores) < 2 or len(os.sched_getaffinity(0)) < 2:
        return np.argpartition(scores, kth, axis=1)[:, kth:]
    halves = np.array_split(scores, 2)
    return np.vstack(list(_pool().map(lambda half: np.argpartition(half, kth, axis=1)[:, kth:], halves)))


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=2, thread_name_prefix="recflow-topk")


def _masked(scores: np.ndarray, rows: sp.csr_matrix, cold: np.ndarray, seen: Sequence[np.ndarray] | None) -> np.ndarray:
    """Scores with the items each user had (row non-zeros, `seen`) and cold items set to -inf."""
    scores = np.asarray(scores, dtype=np.float32)
    scores[:, cold] = -np.inf
    r, c = rows.nonzero()
    scores[r, c] = -np.inf
    if seen is not None:
        for i, items in enumerate(seen):
            if len(items):
                scores[i, items] = -np.inf
    return scores


def als_top(
    model: ScoringModel,
    vectors: np.ndarray,
    mask_rows: sp.csr_matrix,
    seen: Sequence[np.ndarray] | None,
    n: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's n highest ALS scores (vector . item factors) among the items not had (`mask_rows` non-zeros,
    `seen`) that have any history, best first; PAD / -inf where fewer. Above ALS_BLOCK_CELLS, implicit's own
    top-k computes the dot products and keeps the best in one pass, on every core, without a users x items block;
    below it `_top` over the masked block: the same items in the same order."""
    n_users, n_items = mask_rows.shape[0], len(model.popularity)
    n = min(n, n_items)
    if n == 0 or n_users == 0:
        return np.full((n_users, n), PAD, dtype=np.int64), np.full((n_users, n), -np.inf, dtype=np.float32)
    if n_users * n_items < ALS_BLOCK_CELLS:
        scores = np.asarray(vectors, dtype=np.float32).reshape(n_users, -1) @ model.item_factors.T
        return _top(_masked(scores, mask_rows, model.popularity <= 0, seen), n)
    had = mask_rows.astype(bool).tocsr()  # the non-zeros only, as `_masked` excludes them
    had.eliminate_zeros()
    if seen is not None and any(len(items) for items in seen):
        rows = np.repeat(np.arange(n_users), [len(items) for items in seen])
        columns = np.concatenate([np.asarray(items, dtype=np.int64) for items in seen])
        had = (had + sp.csr_matrix((np.ones(len(rows), dtype=bool), (rows, columns)), shape=had.shape)).tocsr()
    ids, scores = topk(
        np.ascontiguousarray(model.item_factors, dtype=np.float32),
        np.ascontiguousarray(vectors, dtype=np.float32).reshape(n_users, -1),
        n,
        filter_query_items=had,
        filter_items=np.flatnonzero(model.popularity <= 0),
        num_threads=0,
    )
    return clean_topk(ids, scores)


def popular_top(
    model: ScoringModel, mask_rows: sp.csr_matrix, seen: Sequence[np.ndarray] | None, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's n most popular items not had (rows non-zeros, `seen`), best first, as `_top` would rank the
    popularity scores, without a users x items block: every user's top n lies within the first n + (items the
    user had) of the popular order."""
    order = model.popular_order
    n_users = mask_rows.shape[0]
    had = np.diff(mask_rows.indptr)
    if seen is not None:
        had = had + np.asarray([len(s) for s in seen], dtype=had.dtype)
    head = order[: n + int(had.max(initial=0))]
    excluded = mask_rows[:, head].toarray() != 0
    if seen is not None:
        position = np.full(len(model.popularity), -1, dtype=np.int64)
        position[head] = np.arange(len(head))
        for i, items in enumerate(seen):
            hit = position[np.asarray(items, dtype=np.int64)]
            excluded[i, hit[hit >= 0]] = True
    first = np.argsort(excluded, axis=1, kind="stable")[:, :n]  # kept items first, in popular order
    items = np.where(np.take_along_axis(excluded, first, axis=1), PAD, head[first])
    width, n = items.shape[1], min(n, len(model.popularity))
    out_items = np.full((n_users, n), PAD, dtype=np.int64)
    out_scores = np.full((n_users, n), -np.inf, dtype=np.float32)
    out_items[:, :width] = items
    out_scores[:, :width] = np.where(items == PAD, -np.inf, model.popularity[np.where(items == PAD, 0, items)])
    return out_items, out_scores


def item_item_scores(model: ScoringModel, rows: sp.csr_matrix) -> np.ndarray:
    """row @ W: how strongly each item follows from what each user had."""
    assert model.item_item is not None
    if sp.issparse(model.item_item):
        return np.asarray((rows @ model.item_item).todense(), dtype=np.float32)
    return np.asarray(rows @ model.item_item, dtype=np.float32)


def _popularity_tie(model: ScoringModel) -> np.ndarray:
    return (model.popularity / max(float(model.popularity.max(initial=0.0)), 1e-12) * POPULARITY_TIE).astype(np.float32)


def two_stage_candidates(
    model: ScoringModel,
    rows: sp.csr_matrix,
    vectors: np.ndarray,
    seen: Sequence[np.ndarray] | None = None,
    mask_rows: sp.csr_matrix | None = None,
) -> CandidateSet:
    """ALS top-N, then the top popular and top item-item items each user has not had and ALS did not propose.

    Every candidate carries its ALS score; `CandidateSet.item_item` its item-item score (when the model has one)."""
    cold = model.popularity <= 0
    mask_rows = rows if mask_rows is None else mask_rows
    n_users = rows.shape[0]
    als_items, _ = als_top(model, vectors, mask_rows, seen, model.n_candidates)
    blocks = [als_items]
    sources = [np.where(als_items != PAD, SOURCE_ALS, 0).astype(np.int8)]
    taken = np.zeros((n_users, len(model.popularity)), dtype=bool)
    rows_index = np.arange(n_users)[:, None]
    taken[rows_index, np.where(als_items == PAD, 0, als_items)] |= als_items != PAD
    ii = item_item_scores(model, rows) if model.item_item is not None else None
    extra_sources: list[tuple[int, np.ndarray | None, int]] = [(SOURCE_POPULAR, None, model.n_popular)]
    if ii is not None:  # ranked as the item-item kinds rank (popularity breaks ties)
        extra_sources.append((SOURCE_ITEM_ITEM, ii + _popularity_tie(model), model.n_item_item))
    for bit, scores, n in extra_sources:
        if n <= 0:
            continue
        if scores is None:
            top, _ = popular_top(model, mask_rows, seen, n)
        else:
            top, _ = _top(_masked(scores, mask_rows, cold, seen), n)
        valid = top != PAD
        already = taken[rows_index, np.where(valid, top, 0)] & valid
        for block, source in zip(blocks, sources, strict=True):  # mark items other sources already proposed
            same = (block[:, :, None] == np.where(already, top, -2)[:, None, :]).any(axis=2)
            source[same] |= bit
        new = np.where(valid & ~already, top, PAD)
        order = np.argsort(new == PAD, axis=1, kind="stable")
        new = np.take_along_axis(new, order, axis=1)
        taken[rows_index, np.where(new == PAD, 0, new)] |= new != PAD
        blocks.append(new)
        sources.append(np.where(new != PAD, bit, 0).astype(np.int8))
    items = np.hstack(blocks)
    safe = np.where(items == PAD, 0, items)
    als_raw = np.einsum("uf,ukf->uk", vectors, model.item_factors[safe]).astype(np.float32)
    item_item = None if ii is None else np.take_along_axis(ii, safe, axis=1)
    return CandidateSet(
        items=items,
        scores=np.where(items == PAD, -np.inf, als_raw).astype(np.float32),
        sources=np.hstack(sources),
        item_item=None if item_item is None else np.where(items == PAD, np.nan, item_item).astype(np.float32),
    )


def candidates_of(model: ScoringModel, rows: sp.csr_matrix, vectors: np.ndarray) -> CandidateSet:
    """`two_stage_candidates` of many users, `batch_users` at a time (memory: one users x items block)."""
    step = batch_users(len(model.popularity))
    parts = [
        two_stage_candidates(model, rows[start : start + step], vectors[start : start + step])
        for start in range(0, max(rows.shape[0], 1), step)
    ]
    item_item = [p.item_item for p in parts]
    return CandidateSet(
        items=np.vstack([p.items for p in parts]),
        scores=np.vstack([p.scores for p in parts]),
        sources=np.vstack([p.sources for p in parts]),
        item_item=None if item_item[0] is None else np.vstack([x for x in item_item if x is not None]),
    )


def score_users(
    model: ScoringModel,
    rows: sp.csr_matrix,
    k: int,
    *,
    vectors: np.ndarray | None = None,
    rerank_fn: object = None,
    seen: Sequence[np.ndarray] | None = None,
    kind: str | None = None,
    exclude_seen: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k items and scores (users x k, PAD / -inf where fewer) for users whose state is `rows` (and
    `vectors` for the ALS kinds). `rerank_fn(user_positions, candidates, k)` reranks two-stage candidates;
    `kind` overrides the model's own (to score the baselines a bundle carries); `exclude_seen=False` lets
    items the user had come back."""
    kind = kind or model.kind
    n_users = rows.shape[0]
    items = np.full((n_users, k), PAD, dtype=np.int64)
    scores = np.full((n_users, k), -np.inf, dtype=np.float32)
    cold = model.popularity <= 0
    step = batch_users(len(model.popularity))
    for start in range(0, n_users, step):
        batch = slice(start, min(start + step, n_users))
        batch_rows = rows[batch]
        mask_rows = batch_rows if exclude_seen else sp.csr_matrix(batch_rows.shape, dtype=np.float32)
        batch_vectors = None if vectors is None else vectors[batch]
        batch_seen = None if seen is None or not exclude_seen else seen[batch]
        if kind == KIND_TWO_STAGE:
            assert batch_vectors is not None and callable(rerank_fn)
            candidates = two_stage_candidates(model, batch_rows, batch_vectors, batch_seen, mask_rows)
            top, top_scores = rerank_fn(np.arange(batch.start, batch.stop), candidates, k)
        elif kind == KIND_POPULARITY:
            top, top_scores = popular_top(model, mask_rows, batch_seen, k)
        elif kind == KIND_ALS:
            if batch_vectors is None:
                raise ValueError("ALS scoring needs the users' vectors")
            top, top_scores = als_top(model, batch_vectors, mask_rows, batch_seen, k)
        elif kind in ITEM_ITEM_KINDS:
            raw = item_item_scores(model, batch_rows) + _popularity_tie(model)
            top, top_scores = _top(_masked(raw, mask_rows, cold, batch_seen), k)
        else:
            raise ValueError(f"unknown model kind {kind!r}")
        items[batch, : top.shape[1]] = top
        scores[batch, : top.shape[1]] = top_scores
    return items, scores
