"""Candidate generators: implicit ALS (with automatic tuning), item-kNN and EASE item-item weights.

Every generator answers `recommend(users, n) -> (items, scores)`: users x n item indices (padded with -1)
and their scores, never returning an item the user already had nor an item without any history. BLAS runs on
the one thread each entry point set at start-up (`recflow.threads`); nothing here changes it per call.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import numpy as np
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from implicit.nearest_neighbours import BM25Recommender, CosineRecommender, ItemItemRecommender
from implicit.utils import ParameterWarning
from scipy.linalg import lapack
from threadpoolctl import threadpool_limits

from recflow.config import ALSSettings
from recflow.model.metrics import PAD, GroundTruth, ndcg_per_user

logger = logging.getLogger(__name__)

BATCH_USERS = 2048
EASE_BLOCK = 1024  # item columns of the Gram matrix built (and mirrored) at once
FILTERED_SCORE = -1e30  # implicit pads filtered items with about -3.4e38


class Recommender(Protocol):
    def recommend(self, users: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class ALSParams:
    factors: int
    regularization: float
    alpha: float
    iterations: int
    random_state: int

    @classmethod
    def from_settings(cls, als: ALSSettings) -> ALSParams:
        return cls(als.factors, als.regularization, als.alpha, als.iterations, als.random_state)


def fit_als(
    user_items: sp.csr_matrix,
    params: ALSParams,
    *,
    on_iteration: Callable[[int], None] | None = None,
    warm_start: AlternatingLeastSquares | None = None,
    iterations: int | None = None,
) -> AlternatingLeastSquares:
    """Fit implicit's CPU ALS on a users x items confidence matrix (never the GPU factory default).

    With `warm_start` (a model of the same shape and factors), the fit starts from a copy of its factors instead
    of random ones and runs `iterations` (a few reach what a fit from scratch reaches in `params.iterations`);
    without one, or when its shape differs, the fit starts from random factors and runs `params.iterations`.
    """
    n_users, n_items = user_items.shape
    warm = (
        warm_start is not None
        and warm_start.user_factors.shape == (n_users, params.factors)
        and warm_start.item_factors.shape == (n_items, params.factors)
    )
    model = AlternatingLeastSquares(
        factors=params.factors,
        regularization=params.regularization,
        alpha=params.alpha,
        iterations=(iterations or params.iterations) if warm else params.iterations,
        random_state=params.random_state,
    )
    if warm and warm_start is not None:
        model.user_factors = warm_start.user_factors.copy()
        model.item_factors = warm_start.item_factors.copy()
    callback = (lambda iteration, _elapsed, _loss: on_iteration(iteration)) if on_iteration else None
    model.fit(user_items, show_progress=False, callback=callback)
    return model


def clean_topk(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Turn implicit's padding (filtered items, N past the catalogue) into PAD / -inf."""
    ids = np.asarray(ids, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    bad = scores <= FILTERED_SCORE
    ids[bad] = PAD
    scores[bad] = -np.inf
    return ids, scores


class ImplicitCandidates:
    """Top-n of an implicit model (ALS or item-kNN), excluding each user's history and items with none."""

    def __init__(self, model: AlternatingLeastSquares | BM25Recommender, history: sp.csr_matrix) -> None:
        self.model = model
        self.history = history
        self.cold = np.asarray(history.getnnz(axis=0)) == 0
        # implicit's item-kNN scores only neighbours: already-seen items come back with score 0 instead of
        # being filtered, so ask it for more and filter here (ALS filters them itself).
        self.post_filter = not isinstance(model, AlternatingLeastSquares)

    def recommend(self, users: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        users = np.asarray(users)
        all_ids = np.full((len(users), n), PAD, dtype=np.int64)
        all_scores = np.full((len(users), n), -np.inf, dtype=np.float32)
        filter_items = np.flatnonzero(self.cold) if self.cold.any() else None
        seen_counts = np.diff(self.history.indptr)
        for start in range(0, len(users), BATCH_USERS):
            batch = users[start : start + BATCH_USERS]
            history = self.history[batch]
            extra = int(seen_counts[batch].max()) if self.post_filter and len(batch) else 0
            # never ask past the catalogue: implicit pads that with item 0 and score 0
            asked = min(n + extra, self.history.shape[1])
            ids, scores = self.model.recommend(batch, history, N=asked, filter_items=filter_items)
            ids, scores = clean_topk(ids.reshape(len(batch), -1), scores.reshape(len(batch), -1))
            if self.post_filter:
                ids, scores = _drop_seen(ids, scores, history, self.cold)
            width = min(n, ids.shape[1])
            all_ids[start : start + len(batch), :width] = ids[:, :width]
            all_scores[start : start + len(batch), :width] = scores[:, :width]
        return all_ids, all_scores


def _drop_seen(
    ids: np.ndarray, scores: np.ndarray, history: sp.csr_matrix, cold: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Replace seen or cold items by PAD and move the padding to the end of each row, keeping the order."""
    rows = np.repeat(np.arange(len(ids)), ids.shape[1])
    safe = np.where(ids == PAD, 0, ids).ravel()
    seen = np.asarray(history[rows, safe]).ravel() != 0
    bad = (seen | cold[safe]).reshape(ids.shape) | (ids == PAD)
    order = np.argsort(bad, axis=1, kind="stable")
    ids = np.where(bad, PAD, ids)
    scores = np.where(bad, -np.inf, scores)
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)


def knn_similarity(history: sp.csr_matrix, neighbours: int = 100, weighting: str = "bm25") -> sp.csr_matrix:
    """Items x items item-kNN similarity (implicit's): a user's item scores are row @ similarity."""
    return item_knn(history, neighbours, weighting).model.similarity.tocsr().astype(np.float32)


def ease_weights(history: sp.csr_matrix, regularization: float) -> np.ndarray:
    """EASE (Steck 2019): B = I - P diag(1/diag(P)), P = (X'X + lambda I)^-1, on the binarised history;
    a user's item scores are row @ B. Dense items x items float32, computed in place: the Gram matrix is built a
    block of columns at a time and inverted by LAPACK's Cholesky (X'X + lambda I is positive definite), so the
    peak is one items x items matrix (`ease_bytes`) and the inverse costs a quarter of a float64 `inv`."""
    binary = history.astype(np.float32, copy=True)
    binary.data[:] = 1.0
    n = binary.shape[1]
    gram = np.empty((n, n), dtype=np.float32)
    left, right = binary.T.tocsr(), binary.tocsc()
    for start in range(0, n, EASE_BLOCK):  # a block's sparse product stays small however dense X'X is
        gram[:, start : start + EASE_BLOCK] = (left @ right[:, start : start + EASE_BLOCK]).toarray()
    gram[np.diag_indices(n)] += regularization
    # X'X is symmetric, so its C-ordered array is also the Fortran-ordered one that LAPACK overwrites in place. The
    # process runs BLAS on one thread (recflow.threads); this one long call takes every core the process may use
    with threadpool_limits(len(os.sched_getaffinity(0)), "blas"):
        factor, info = lapack.spotrf(gram.T, lower=False, overwrite_a=True, clean=False)
        if info == 0:
            factor, info = lapack.spotri(factor, lower=False, overwrite_c=True)
    if info != 0:
        raise ValueError(f"EASE: X'X + {regularization:g} I is not positive definite (LAPACK info {info})")
    inverse = factor.T  # the upper triangle of the Fortran view: the lower one of `gram`, the other is stale
    for start in range(0, n, EASE_BLOCK):  # mirror the lower triangle into the upper, a block at a time
        stop = min(start + EASE_BLOCK, n)
        inverse[start:stop, stop:] = inverse[stop:, start:stop].T
        block = inverse[start:stop, start:stop]
        block[np.triu_indices(stop - start, 1)] = block.T[np.triu_indices(stop - start, 1)]
    diagonal = np.diag(inverse).copy()
    inverse /= -diagonal  # column j divided by -P_jj
    inverse[np.diag_indices(n)] = 0.0
    return np.asarray(inverse, dtype=np.float32)


def ease_bytes(n_items: int) -> int:
    """Memory of one EASE weight matrix (float32 items x items), the most `ease_weights` holds at once."""
    return 4 * n_items * n_items


# implicit's item-item recommenders by how they weigh co-occurrence: BM25-weighted, cosine, or the plain count of
# users (sessions) that had both items, weighted by confidence
KNN_WEIGHTINGS = {"bm25": BM25Recommender, "cosine": CosineRecommender, "count": ItemItemRecommender}


def item_knn(history: sp.csr_matrix, neighbours: int = 100, weighting: str = "bm25") -> ImplicitCandidates:
    """The item-kNN baseline: one of implicit's item-item recommenders (KNN_WEIGHTINGS)."""
    model = KNN_WEIGHTINGS[weighting](K=neighbours)
    with warnings.catch_warnings():
        # implicit's own bm25_weight hands its kNN a COO matrix and then warns about converting it
        warnings.filterwarnings("ignore", message="Method expects CSR input", category=ParameterWarning)
        model.fit(history.astype(np.float64), show_progress=False)  # implicit's plain kNN takes doubles only
    return ImplicitCandidates(model, history)


SOURCE_ALS, SOURCE_POPULAR, SOURCE_ITEM_ITEM = 1, 2, 4  # bits of CandidateSet.sources


@dataclass(frozen=True)
class CandidateSet:
    """Each user's candidates for the ranker: users x width item indices (PAD-padded at the end of each source's
    block), their ALS scores, and which generator(s) proposed them."""

    items: np.ndarray  # int64
    scores: np.ndarray  # float32, the ALS score user . item (-inf at PAD)
    sources: np.ndarray  # int8 bit mask of SOURCE_*, 0 at PAD
    item_item: np.ndarray | None = None  # float32, the item-item model's score (NaN at PAD), when there is one


@dataclass(frozen=True)
class TuneResult:
    params: ALSParams
    models: list[AlternatingLeastSquares]  # one per fold, fitted on the fold's history with `params`
    trials: list[dict[str, float]]
    tuned: bool


SEARCH_GRID: dict[str, tuple[float, ...]] = {
    "alpha": (0.3, 1.0, 3.0, 10.0, 30.0, 100.0),
    "regularization": (0.01, 0.05, 0.2, 1.0, 5.0),
    "factors": (32, 64, 128),
}


def tune_als(
    folds: list[tuple[sp.csr_matrix, GroundTruth]],
    settings: ALSSettings,
    *,
    k: int = 10,
    on_trial: Callable[[dict[str, float]], None] | None = None,
    fitted: dict[ALSParams, list[AlternatingLeastSquares]] | None = None,
    combine: Callable[[list[np.ndarray]], float] | None = None,
    clearly_better: Callable[[list[np.ndarray], list[np.ndarray]], bool] | None = None,
) -> TuneResult:
    """Coordinate search over alpha, regularization and factors, scored by NDCG@k over validation folds (each a
    history matrix and the users it is judged on): `combine` makes one figure of the folds' per-user values (by
    default the mean over all their users), and a trial replaces the best so far when `clearly_better(trial's
    values, best's values)` (by default: a higher figure).

    Starts from params.yaml (always scored), then sweeps each searched parameter over its grid keeping the best
    value, until the grid is exhausted or `max_trials` were run (and, only when `budget_seconds` is set, the next
    trial would end past it: a wall-clock budget makes the choice depend on the machine). With tuning disabled
    the params.yaml values are used as they are (pinned). `fitted` holds fits already made on these folds'
    matrices (one per fold, by parameters): they are scored, not fitted again.
    """
    start_params = ALSParams.from_settings(settings)
    tune = settings.tune
    rng = np.random.default_rng(settings.random_state)
    judged = []
    for _, truth in folds:
        users, relevant = truth.users, truth.relevant
        if len(users) > tune.max_users:
            rows = np.sort(rng.choice(len(users), tune.max_users, replace=False))
            users, relevant = users[rows], relevant[rows]
        judged.append((users, relevant))

    trials: list[dict[str, float]] = []
    scored: dict[ALSParams, tuple[float, list[AlternatingLeastSquares], list[np.ndarray]]] = {}

    def score(params: ALSParams) -> float:
        if params not in scored:
            began = time.perf_counter()
            models, values = [], []
            known = (fitted or {}).get(params)
            for index, ((history, _), (users, relevant)) in enumerate(zip(folds, judged, strict=True)):
                model = known[index] if known is not None else fit_als(history, params)
                recs, _ = ImplicitCandidates(model, history).recommend(users, k)
                values.append(ndcg_per_user(recs, relevant, k))
                models.append(model)
            metric = combine(values) if combine is not None else float(np.concatenate(values).mean())
            trial = {**asdict(params), f"ndcg@{k}": round(metric, 5), "seconds": round(time.perf_counter() - began, 3)}
            trials.append(trial)
            if on_trial:
                on_trial(trial)
            logger.info("ALS trial %s: ndcg@%d=%.4f", params, k, metric)
            scored[params] = (metric, models, values)
        return scored[params][0]

    best = start_params
    score(best)
    deadline = None if tune.budget_seconds is None else time.perf_counter() + tune.budget_seconds
    if tune.enabled:
        for name in tune.search:
            for value in SEARCH_GRID[name]:
                if len(trials) >= tune.max_trials:
                    break
                typical = float(np.mean([trial["seconds"] for trial in trials]))
                if deadline is not None and time.perf_counter() + typical > deadline:
                    break  # a trial that would end past the budget is not started
                candidate = replace(best, **{name: type(getattr(best, name))(value)})
                if clearly_better is None:
                    better = score(candidate) > score(best)
                else:
                    score(candidate)
                    better = clearly_better(scored[candidate][2], scored[best][2])
                if better:
                    best = candidate
    return TuneResult(params=best, models=scored[best][1], trials=trials, tuned=tune.enabled)
