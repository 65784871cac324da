"""Known answers for the candidate generators, and one contract that every recommender must keep."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp

from recflow.config import ALSSettings, TuneSettings
from recflow.model import candidates, scoring
from recflow.model.candidates import (
    EASE_BLOCK,
    KNN_WEIGHTINGS,
    SOURCE_ALS,
    SOURCE_ITEM_ITEM,
    SOURCE_POPULAR,
    ALSParams,
    CandidateSet,
    ImplicitCandidates,
    ease_bytes,
    ease_weights,
    fit_als,
    item_knn,
    knn_similarity,
    tune_als,
)
from recflow.model.metrics import PAD, GroundTruth
from recflow.model.scoring import (
    _top,
    candidates_of,
    popular_order,
    popular_top,
    score_users,
    two_stage_candidates,
)

N_BLOCKS, USERS_PER_BLOCK, ITEMS_PER_BLOCK = 3, 20, 8


def block_matrix() -> tuple[sp.csr_matrix, np.ndarray]:
    """Users of block b had every item of block b except one held out (a different one per user)."""
    rows, cols, held_out = [], [], []
    for b in range(N_BLOCKS):
        for j in range(USERS_PER_BLOCK):
            user = b * USERS_PER_BLOCK + j
            hidden = b * ITEMS_PER_BLOCK + j % ITEMS_PER_BLOCK
            held_out.append(hidden)
            for item in range(b * ITEMS_PER_BLOCK, (b + 1) * ITEMS_PER_BLOCK):
                if item != hidden:
                    rows.append(user)
                    cols.append(item)
    shape = (N_BLOCKS * USERS_PER_BLOCK, N_BLOCKS * ITEMS_PER_BLOCK + 2)  # two items nobody had
    matrix = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=shape)
    return matrix, np.array(held_out)


PARAMS = ALSParams(factors=8, regularization=0.01, alpha=5.0, iterations=20, random_state=1)


def test_als_recommends_the_held_out_in_block_item() -> None:
    matrix, held_out = block_matrix()
    model = fit_als(matrix, PARAMS)
    items, _ = ImplicitCandidates(model, matrix).recommend(np.arange(matrix.shape[0]), 1)
    assert (items[:, 0] == held_out).mean() == 1.0


def test_a_warm_started_refit_needs_few_iterations_and_leaves_its_start_untouched() -> None:
    """The backtest and production fits start from the previous fit's factors (training.py)."""
    matrix, held_out = block_matrix()
    earlier = sp.diags((np.arange(matrix.shape[0]) % 2).astype(np.float32)) @ matrix  # even users had nothing yet
    start = fit_als(earlier, PARAMS)
    before = start.item_factors.copy()
    model = fit_als(matrix, PARAMS, warm_start=start, iterations=2)
    assert model.iterations == 2
    assert np.array_equal(start.item_factors, before)
    items, _ = ImplicitCandidates(model, matrix).recommend(np.arange(matrix.shape[0]), 1)
    assert (items[:, 0] == held_out).mean() == 1.0


def test_a_warm_start_of_another_shape_falls_back_to_a_full_fit() -> None:
    matrix, _ = block_matrix()
    start = fit_als(matrix[:, :-1], PARAMS)
    assert fit_als(matrix, PARAMS, warm_start=start, iterations=2).iterations == PARAMS.iterations


@pytest.mark.parametrize("weighting", list(KNN_WEIGHTINGS))
def test_item_knn_stays_in_block(weighting: str) -> None:
    matrix, held_out = block_matrix()
    items, _ = item_knn(matrix, neighbours=10, weighting=weighting).recommend(np.arange(matrix.shape[0]), 1)
    assert np.all(items[:, 0] // ITEMS_PER_BLOCK == held_out // ITEMS_PER_BLOCK)


def test_count_weighting_is_the_confidence_weighted_co_occurrence() -> None:
    rows = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 2, 1, 0], [0, 0, 0, 1]], dtype=np.float32))
    got = knn_similarity(rows, neighbours=4, weighting="count").toarray()
    expected = (rows.T @ rows).toarray()
    np.fill_diagonal(expected, 0)
    np.testing.assert_allclose(np.where(np.eye(4, dtype=bool), 0, got), expected)


def scoring_model(matrix: sp.csr_matrix, item_item: object = None, n_popular: int = 0, n_item_item: int = 0) -> object:
    """What model.scoring needs, from a block matrix: ALS factors, all-time popularity, item-item weights."""
    model = fit_als(matrix, PARAMS)
    popularity = np.asarray(matrix.sum(axis=0)).ravel().astype(np.float32)
    return SimpleNamespace(
        kind="als",
        item_factors=model.item_factors,
        user_factors=model.user_factors,
        popularity=popularity,
        popular_order=popular_order(popularity),
        item_item=item_item,
        n_candidates=2,
        n_popular=n_popular,
        n_item_item=n_item_item,
    )


KINDS = {
    "popularity": lambda m: None,
    "item_knn": lambda m: knn_similarity(m, 10),
    "ease": lambda m: ease_weights(m, 10.0),
    "als": lambda m: None,
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("n", [1, 5, 40])
def test_contract_no_seen_no_cold_padding_last_scores_descending(kind: str, n: int) -> None:
    """One contract over every one-stage model kind, through the one scoring function."""
    matrix, _ = block_matrix()
    model = scoring_model(matrix, KINDS[kind](matrix))
    users = np.arange(matrix.shape[0])
    items, scores = score_users(model, matrix, n, vectors=model.user_factors, kind=kind)
    assert items.shape == scores.shape == (len(users), n)
    cold = {matrix.shape[1] - 2, matrix.shape[1] - 1}
    for user in users:
        row = items[user]
        real = row[row != PAD]
        assert not set(real) & set(matrix[user].indices), "an item the user already had came back"
        assert not set(real) & cold, "an item without history came back"
        assert len(set(real)) == len(real)
        assert np.all(row[len(real) :] == PAD), "padding must come after the real items"
        assert np.all(np.diff(scores[user][: len(real)]) <= 1e-6)
    if n == 40:  # more asked than each user can get: every unseen warm item is returned, then padding
        assert np.all((items != PAD).sum(axis=1) == ITEMS_PER_BLOCK * N_BLOCKS - (ITEMS_PER_BLOCK - 1))


@pytest.mark.parametrize("kind", ["item_knn", "ease", "als"])
def test_personal_models_recommend_the_held_out_in_block_item(kind: str) -> None:
    matrix, held_out = block_matrix()
    model = scoring_model(matrix, KINDS[kind](matrix))
    items, _ = score_users(model, matrix, 1, vectors=model.user_factors, kind=kind)
    assert (items[:, 0] == held_out).mean() == 1.0


def test_popularity_orders_by_summed_confidence() -> None:
    matrix = sp.csr_matrix(np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=np.float32))
    popularity = np.asarray(matrix.sum(axis=0)).ravel()
    model = SimpleNamespace(popularity=popularity, popular_order=popular_order(popularity), kind="popularity")
    items, _ = score_users(model, matrix[[3, 0]], 3)
    assert items.tolist() == [[0, 1, 2], [1, 2, PAD]]


@pytest.mark.parametrize("n", [1, 7, 60, 500])
def test_popular_top_ranks_as_the_full_popularity_scores_do(n: int) -> None:
    """The popular top-n walks the popular order instead of ranking a users x items block: same items, same
    scores, whatever users had (a heavy user had most of the popular head) and were `seen` to have."""
    rng = np.random.default_rng(3)
    n_users, n_items = 40, 300
    dense = (rng.random((n_users, n_items)) < rng.random((n_users, 1)) * 0.6).astype(np.float32)
    dense[0, :250] = 1.0  # the heaviest user had almost everything
    rows = sp.csr_matrix(dense)
    popularity = rng.permutation(n_items).astype(np.float32)  # distinct: one right order
    popularity[rng.choice(n_items, 20, replace=False)] = 0.0  # items without history are never returned
    model = SimpleNamespace(popularity=popularity, popular_order=popular_order(popularity))
    seen = [rng.choice(n_items, int(rng.integers(0, 30)), replace=False) for _ in range(n_users)]
    full = np.broadcast_to(popularity, (n_users, n_items)).copy()
    full[:, popularity <= 0] = -np.inf
    full[dense > 0] = -np.inf
    for i, items in enumerate(seen):
        full[i, items] = -np.inf
    want_items, want_scores = _top(full, n)
    items, scores = popular_top(model, rows, seen, n)
    assert np.array_equal(items, want_items) and np.array_equal(scores, want_scores)
    assert items.shape == (n_users, min(n, n_items))


def test_candidates_in_batches_equal_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Candidates are built BATCH_USERS users at a time (memory); the result is the one-block result."""
    matrix, _ = block_matrix()
    model = scoring_model(matrix, knn_similarity(matrix, 10), n_popular=3, n_item_item=4)
    whole = two_stage_candidates(model, matrix, model.user_factors)
    monkeypatch.setattr(scoring, "BATCH_USERS", 7)
    batched = candidates_of(model, matrix, model.user_factors)
    assert_same_candidates(batched, whole)


def assert_same_candidates(got: CandidateSet, want: CandidateSet) -> None:
    for name in ("items", "scores", "sources", "item_item"):
        assert np.array_equal(getattr(got, name), getattr(want, name), equal_nan=name != "items"), name


def test_a_wide_catalogue_is_scored_fewer_users_at_a_time_with_the_same_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Blocks hold at most BLOCK_CELLS users x items cells (at least one user): here 3 users at a time, and the
    answers are those of one block (the same items; scores up to float32 rounding of a smaller matrix product)."""
    matrix, _ = block_matrix()
    model = scoring_model(matrix, knn_similarity(matrix, 10), n_popular=3, n_item_item=4)
    n_items = matrix.shape[1]
    assert scoring.batch_users(10**9) == 1 and scoring.batch_users(n_items) == scoring.BATCH_USERS
    answers = {k: score_users(model, matrix, 4, vectors=model.user_factors, kind=k) for k in ("item_knn", "als")}
    whole = candidates_of(model, matrix, model.user_factors)
    monkeypatch.setattr(scoring, "BLOCK_CELLS", 3 * n_items + 1)
    assert scoring.batch_users(n_items) == 3
    for kind, (items, scores) in answers.items():
        again = score_users(model, matrix, 4, vectors=model.user_factors, kind=kind)
        assert np.array_equal(again[0], items) and np.allclose(again[1], scores, rtol=1e-5, atol=1e-6), kind
    batched = candidates_of(model, matrix, model.user_factors)
    assert_same_candidates(batched, whole)


def test_a_large_block_is_partitioned_in_halves_side_by_side_with_the_same_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Above PARALLEL_CELLS a block's top-k is partitioned in two row halves on two threads: the same items and
    scores as one partition, ties and rows of fewer finite scores (PAD) included."""
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, size=(9, 40)).astype(np.float32)  # many ties
    scores[2, 3:] = -np.inf  # three finite scores, fewer than n
    one = _top(scores, 6)
    monkeypatch.setattr(scoring, "PARALLEL_CELLS", 1)
    monkeypatch.setattr(scoring.os, "sched_getaffinity", lambda _pid: {0, 1})
    halves = _top(scores, 6)
    assert np.array_equal(halves[0], one[0]) and np.array_equal(halves[1], one[1])
    assert list(halves[0][2][3:]) == [PAD] * 3


def _truth(matrix: sp.csr_matrix, held_out: np.ndarray) -> GroundTruth:
    return GroundTruth(
        users=np.arange(matrix.shape[0]),
        relevant=sp.csr_matrix((np.ones(len(held_out)), (np.arange(len(held_out)), held_out)), shape=matrix.shape),
    )


def test_tuning_scores_given_fits_without_fitting_them_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The selection's decay trials already fitted the starting parameters: the ALS search scores those fits."""
    matrix, held_out = block_matrix()
    given = fit_als(matrix, PARAMS)
    settings = ALSSettings(**{**PARAMS.__dict__, "tune": TuneSettings(enabled=False)})

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a given fit was fitted again")

    monkeypatch.setattr(candidates, "fit_als", refuse)
    tuned = tune_als([(matrix, _truth(matrix, held_out))], settings, fitted={PARAMS: [given]})
    assert tuned.models == [given] and len(tuned.trials) == 1


def test_tuning_keeps_the_best_trial_and_respects_pinning() -> None:
    matrix, held_out = block_matrix()
    truth = _truth(matrix, held_out)
    base = ALSSettings(factors=8, regularization=0.01, alpha=5.0, iterations=10, random_state=1)
    tuned = tune_als([(matrix, truth)], base.__class__(**{**base.__dict__, "tune": TuneSettings(max_trials=6)}))
    best = max(trial["ndcg@10"] for trial in tuned.trials)
    chosen = next(t for t in tuned.trials if all(t[k] == v for k, v in tuned.params.__dict__.items()))
    assert chosen["ndcg@10"] == best
    assert len(tuned.trials) <= 6
    pinned = tune_als([(matrix, truth)], base.__class__(**{**base.__dict__, "tune": TuneSettings(enabled=False)}))
    assert pinned.params == ALSParams.from_settings(base) and len(pinned.trials) == 1


def test_a_trial_replaces_the_best_only_when_the_rule_says_it_is_clearly_ahead() -> None:
    """The selection passes its one-standard-error rule: a rule that never sees a clear lead keeps the starting
    parameters whatever the trials score; the rule receives per-user values of the same users."""
    matrix, held_out = block_matrix()
    truth = _truth(matrix, held_out)
    base = ALSSettings(factors=8, regularization=0.01, alpha=5.0, iterations=10, random_state=1)
    seen: list[tuple[int, int]] = []

    def never(trial: list[np.ndarray], best: list[np.ndarray]) -> bool:
        seen.append((len(trial[0]), len(best[0])))
        return False

    settings = base.__class__(**{**base.__dict__, "tune": TuneSettings(max_trials=6)})
    kept = tune_als([(matrix, truth)], settings, clearly_better=never)
    assert kept.params == ALSParams.from_settings(base) and len(kept.trials) == 6
    assert seen == [(len(truth.users), len(truth.users))] * 5


@pytest.mark.parametrize(("n_popular", "n_item_item"), [(0, 0), (3, 0), (30, 0), (3, 5)])
def test_two_stage_candidates_add_unseen_items_once_with_their_source(n_popular: int, n_item_item: int) -> None:
    """Popular items come from every block, ALS proposes in-block items: the lists overlap only in part."""
    matrix, _ = block_matrix()
    knn = knn_similarity(matrix, 10)
    model = scoring_model(matrix, knn if n_item_item else None, n_popular, n_item_item)
    users = np.arange(matrix.shape[0])
    merged = two_stage_candidates(model, matrix, model.user_factors)
    als_items, _ = score_users(model, matrix, 2, vectors=model.user_factors, kind="als")
    popular_top, _ = score_users(model, matrix, n_popular, kind="popularity") if n_popular else (None, None)
    knn_model = scoring_model(matrix, knn)
    ii_top, _ = score_users(knn_model, matrix, n_item_item, kind="item_knn") if n_item_item else (None, None)
    assert merged.items.shape == merged.scores.shape == merged.sources.shape
    assert np.array_equal(merged.items[:, :2], als_items), "the ALS top-n comes first, unchanged"
    cold = {matrix.shape[1] - 2, matrix.shape[1] - 1}
    for user in users:
        row, sources = merged.items[user], merged.sources[user]
        real = row[row != PAD]
        assert len(set(real)) == len(real), "an item proposed by several sources must appear once"
        assert not set(real) & set(matrix[user].indices) and not set(real) & cold
        popular = set() if popular_top is None else set(popular_top[user][popular_top[user] != PAD])
        similar = set() if ii_top is None else set(ii_top[user][ii_top[user] != PAD])
        assert set(real) == set(als_items[user][als_items[user] != PAD]) | popular | similar
        for item, source in zip(row, sources, strict=True):
            expected = (
                (SOURCE_ALS if item in als_items[user] else 0)
                | (SOURCE_POPULAR if item in popular else 0)
                | (SOURCE_ITEM_ITEM if item in similar else 0)
            )
            assert source == (expected if item != PAD else 0)
    if n_popular == 30:  # every unseen item is popular enough: both kinds of candidates occur
        assert (merged.sources == SOURCE_ALS | SOURCE_POPULAR).any() and (merged.sources == SOURCE_POPULAR).any()
    valid = merged.items != PAD
    dots = np.einsum("uf,ukf->uk", model.user_factors, model.item_factors[np.where(valid, merged.items, 0)])
    assert np.allclose(merged.scores[valid], dots[valid], atol=1e-5), "every candidate carries its ALS score"
    assert (merged.item_item is None) == (n_item_item == 0)


def test_tuning_does_not_start_a_trial_past_its_budget() -> None:
    """Regression: the budget was checked only before a trial, so a search could overrun it by a whole trial."""
    matrix, held_out = block_matrix()
    truth = _truth(matrix, held_out)
    base = ALSSettings(factors=8, regularization=0.01, alpha=5.0, iterations=10, random_state=1)
    settings = base.__class__(**{**base.__dict__, "tune": TuneSettings(budget_seconds=0.0, max_trials=16)})
    tuned = tune_als([(matrix, truth)], settings)
    assert len(tuned.trials) == 1 and tuned.params == ALSParams.from_settings(base)


@pytest.mark.parametrize("n_items", [7, EASE_BLOCK + 300])  # one Gram block, and blocks with a ragged last one
def test_ease_weights_match_the_closed_form_in_float64(n_items: int) -> None:
    """The in-place float32 Cholesky inverse gives Steck's B = I - P diag(1/diag P), P = (X'X + lambda I)^-1, of
    the binarised history (confidences > 1 count as 1), with a zero diagonal, in both triangles."""
    rng = np.random.default_rng(3)
    history = sp.random(400, n_items, density=0.02, format="csr", random_state=rng, dtype=np.float32) * 3
    binary = (history > 0).astype(np.float64)
    gram = (binary.T @ binary).toarray() + 25.0 * np.eye(n_items)
    inverse = np.linalg.inv(gram)
    expected = -inverse / np.diag(inverse)
    np.fill_diagonal(expected, 0.0)
    weights = ease_weights(history, 25.0)
    assert weights.dtype == np.float32 and weights.shape == (n_items, n_items)
    assert np.abs(weights - expected).max() <= 1e-5 * max(np.abs(expected).max(), 1e-12)
    assert np.all(np.diag(weights) == 0.0)
    assert ease_bytes(n_items) == weights.nbytes


@pytest.mark.parametrize("block_cells", [0, scoring.ALS_BLOCK_CELLS])  # implicit's top-k, then numpy's block
def test_als_top_is_the_top_of_the_masked_als_scores(block_cells: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """implicit's top-k gives what `_top` over the masked users x items ALS block gives: the same items in the same
    order, items had (row non-zeros, `seen`) and items without history left out, PAD where fewer remain."""
    monkeypatch.setattr(scoring, "ALS_BLOCK_CELLS", block_cells)
    rng = np.random.default_rng(5)
    n_users, n_items = 40, 300
    popularity = rng.random(n_items).astype(np.float32)
    popularity[rng.choice(n_items, 30, replace=False)] = 0.0  # no history: never returned
    model = SimpleNamespace(item_factors=rng.standard_normal((n_items, 8)).astype(np.float32), popularity=popularity)
    vectors = rng.standard_normal((n_users, 8)).astype(np.float32)
    rows = sp.random(n_users, n_items, density=0.05, format="csr", random_state=rng, dtype=np.float32)
    seen = [rng.choice(n_items, 3, replace=False) for _ in range(n_users)]
    expected = scoring._top(scoring._masked(vectors @ model.item_factors.T, rows, popularity <= 0, seen), 20)
    items, scores = scoring.als_top(model, vectors, rows, seen, 20)
    assert np.array_equal(items, expected[0]) and np.allclose(scores, expected[1], rtol=1e-5)
    few = scoring.als_top(model, vectors[:2], rows[:2], None, n_items)  # more asked than items left: padding
    allowed = (
        n_items
        - 30
        - np.diff(rows[:2].indptr)
        + np.array([np.isin(rows[i].indices, np.flatnonzero(popularity <= 0)).sum() for i in range(2)])
    )
    assert np.array_equal((few[0] != PAD).sum(axis=1), allowed) and np.all(np.isinf(few[1][few[0] == PAD]))
