"""The ranker learns a known order, grades labels by the strongest action, sees no future, and trains on
stacked windows that each end where their labels begin."""

from __future__ import annotations

import numpy as np
import pytest

from recflow.config import RankerSettings, SplitSettings
from recflow.model.candidates import SOURCE_ALS, CandidateSet
from recflow.model.features import SECONDS_PER_DAY, SPLIT_TEST, Interactions, assign_split, encode_events, window
from recflow.model.metrics import PAD
from recflow.model.ranker import action_grades, grade_labels, rerank, train_ranker
from recflow.model.ranker_features import build_context, candidate_features, feature_names, following, with_events

from ..factories import ACTIONS, DAY0, event_table

SETTINGS = RankerSettings(n_estimators=60, min_child_samples=5, early_stopping_rounds=20)


def als_candidates(items: list[list[int]] | np.ndarray, scores: np.ndarray) -> CandidateSet:
    items = np.asarray(items, dtype=np.int64)
    sources = np.where(items != PAD, SOURCE_ALS, 0).astype(np.int8)
    return CandidateSet(items, np.where(items != PAD, scores, -np.inf).astype(np.float32), sources)


def test_ranker_learns_a_known_order() -> None:
    """Relevance grows with feature 0 and ignores feature 1: the ranker must order by feature 0."""
    rng = np.random.default_rng(0)
    queries, per_query = 300, 10
    X = rng.random((queries * per_query, 2)).astype(np.float32)
    labels = np.digitize(X[:, 0], [0.5, 0.7, 0.9]).astype(np.int32)  # grades 0..3
    row_user = np.repeat(np.arange(queries), per_query)
    fit = train_ranker(X, labels, row_user, ["signal", "noise"], SETTINGS)
    assert fit.validation_ndcg > 0.95
    assert fit.importances["signal"] > 10 * fit.importances["noise"]
    test = rng.random((50, 2)).astype(np.float32)
    predicted = fit.booster.predict(test)
    grade = np.digitize(test[:, 0], [0.5, 0.7, 0.9])
    higher, lower = np.triu_indices(len(test), 1)
    differ = grade[higher] != grade[lower]
    agree = np.sign(predicted[higher] - predicted[lower]) == np.sign(grade[higher] - grade[lower])
    assert agree[differ].mean() > 0.95  # pairs of different grade come out in the right order


def test_labels_take_the_strongest_action_in_the_target_window() -> None:
    inter = encode_events(
        event_table([("a", "x", "view", 1), ("a", "x", "purchase", 2), ("a", "y", "click", 3), ("b", "x", "view", 4)]),
        ACTIONS,
    )
    grades = action_grades(np.array([0.5, 1.0, 1.5, 2.0]))
    labels = grade_labels(inter, np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), grades)
    assert labels.tolist() == [4, 2, 1, 0]


def test_grades_follow_weights_not_the_order_actions_are_listed_in() -> None:
    assert action_grades(np.array([2.0, 0.5, 1.0])).tolist() == [3, 1, 2]


def test_features_use_only_history_before_the_reference_time() -> None:
    """Popularity windows count events strictly before each user's reference time."""
    inter = encode_events(
        event_table([("a", "x", "view", 0), ("b", "x", "view", 5), ("c", "x", "view", 9.5), ("c", "y", "view", 9.9)]),
        ACTIONS,
    )
    ref = np.array([DAY0 + 10 * SECONDS_PER_DAY, DAY0 + 6 * SECONDS_PER_DAY, DAY0 + 10 * SECONDS_PER_DAY])
    ctx = build_context(inter, ref, np.eye(2, dtype=np.float32), RankerSettings(popularity_windows_days=(1, 7)))
    names = feature_names(ACTIONS, (1, 7))
    X, row_user, _ = candidate_features(ctx, np.array([0, 1]), als_candidates([[0, 1], [0, PAD]], np.ones((2, 2))))
    features = {name: X[:, i] for i, name in enumerate(names)}
    assert row_user.tolist() == [0, 0, 1]
    # user a at day 10: x was seen at days 0, 5 and 9.5 -> 1 in the last day, 2 in the last week, 3 in all
    assert features["item_pop_1d"][0] == 1 and features["item_pop_7d"][0] == 2 and features["item_pop_all"][0] == 3
    # user b at day 6 must not see the views of days 9.5 and 9.9
    assert features["item_pop_7d"][2] == 2 and features["item_pop_all"][2] == 2
    assert features["item_age_days"][2] == 6
    # user a's last item is x, so candidate x is identical to it and y orthogonal
    assert features["sim_last_item"][0] == 1 and features["sim_last_item"][1] == 0
    assert features["from_als"].tolist() == [1, 1, 1] and features["from_popular"].tolist() == [0, 0, 0]


def test_item_item_features_are_free_of_the_scores_scale() -> None:
    """Known answers: each candidate's item-item score as a share of its user's highest and its rank among the
    user's candidates (nan without one); scores 1.25 times larger (a row with a quarter more items, as the model
    fitted on all events has against a validation fold's) give the same features."""
    inter = encode_events(event_table([("a", "x", "view", 0), ("b", "y", "view", 1), ("b", "z", "view", 2)]), ACTIONS)
    ctx = build_context(inter, np.full(2, DAY0 + SECONDS_PER_DAY), np.eye(3, dtype=np.float32), SETTINGS)
    names = feature_names(ACTIONS, SETTINGS.popularity_windows_days)
    items = [[0, 1, 2], [0, 1, PAD]]
    scores = np.array([[0.2, 0.8, np.nan], [0.5, -0.1, np.nan]], dtype=np.float32)

    def item_item(scale: float) -> tuple[np.ndarray, np.ndarray]:
        candidates = als_candidates(items, np.ones((2, 3)))
        candidates = CandidateSet(candidates.items, candidates.scores, candidates.sources, scores * scale)
        X, _, _ = candidate_features(ctx, np.array([0, 1]), candidates)
        return X[:, names.index("item_item_score")], X[:, names.index("item_item_rank")]

    share, rank = item_item(1.0)
    np.testing.assert_allclose(share, [0.25, 1.0, np.nan, 1.0, -0.2], rtol=1e-6)
    np.testing.assert_array_equal(rank, [1, 0, np.nan, 0, 1])
    np.testing.assert_allclose(item_item(1.25)[0], share, rtol=1e-6)
    np.testing.assert_array_equal(item_item(1.25)[1], rank)


def test_next_after_counts_what_followed_the_users_last_item() -> None:
    """In other users' histories y followed x twice and z followed x once; user d's last item is x."""
    rows = [("a", "x", "view", 1), ("a", "y", "view", 2), ("b", "x", "view", 1), ("b", "y", "view", 2)]
    rows += [("c", "x", "view", 1), ("c", "z", "view", 2), ("d", "w", "view", 1), ("d", "x", "view", 3)]
    inter = encode_events(event_table(rows), ACTIONS)
    ids = {item: i for i, item in enumerate(inter.item_ids)}
    user_d = list(inter.user_ids).index("d")
    ctx = build_context(inter, np.full(4, DAY0 + 5 * SECONDS_PER_DAY), np.eye(4, dtype=np.float32), SETTINGS)
    items = np.array([[ids["y"], ids["z"], ids["w"]]])
    X, _, _ = candidate_features(ctx, np.array([user_d]), als_candidates(items, np.ones((1, 3))))
    after_last = X[:, feature_names(ACTIONS, SETTINGS.popularity_windows_days).index("next_after_last")]
    assert after_last.tolist() == pytest.approx([2 / 3, 1 / 3, 0.0])


def test_events_after_a_context_update_its_item_statistics_as_a_context_built_with_them() -> None:
    """The service's item statistics: a context of the history plus the new events (`with_events`, `following`)
    holds the same item counts, windows, first times and transitions as one built from everything."""
    old = [("a", "x", "view", 1), ("a", "y", "purchase", 2), ("b", "x", "view", 1), ("b", "z", "view", 2)]
    old += [("c", "y", "add_to_cart", 3), ("c", "y", "view", 4)]
    new = [("a", "z", "view", 5), ("a", "x", "view", 6), ("c", "w", "purchase", 5), ("d", "y", "view", 6)]
    new += [("d", "y", "view", 7), ("d", "x", "purchase", 8)]
    every = encode_events(event_table(old + new), ACTIONS)
    cut = DAY0 + 5 * SECONDS_PER_DAY
    history, later = every.where(every.ts < cut), every.where(every.ts >= cut)
    ref, vectors = np.full(every.n_users, DAY0 + 9 * SECONDS_PER_DAY), np.eye(every.n_items, dtype=np.float32)
    before = build_context(history, ref, vectors, SETTINGS)
    users = np.unique(later.user_idx)
    moves = following(
        before.recent_items[users, 0], [later.item_idx[later.user_idx == u] for u in users], every.n_items
    )
    extended = with_events(before, later.item_idx, later.action_idx, later.ts, moves)
    expected = build_context(every, ref, vectors, SETTINGS)
    for name in ("item_keys", "item_first_ts", "item_action_counts", "transition_keys", "transition_counts",
                 "item_out_counts"):  # fmt: skip
        np.testing.assert_array_equal(getattr(extended, name), getattr(expected, name), err_msg=name)
    assert len(later) == 6 and len(expected.transition_keys) > len(before.transition_keys)


def test_stacked_windows_keep_a_users_queries_apart() -> None:
    """The same user in two windows is two queries: rows are grouped by query id, not by user."""
    rng = np.random.default_rng(1)
    queries, per_query = 200, 8
    X = rng.random((queries * per_query, 1)).astype(np.float32)
    labels = (X[:, 0] > 0.8).astype(np.int32)
    query = np.repeat(np.arange(queries), per_query)
    fit = train_ranker(X, labels, query, ["signal"], SETTINGS)
    assert fit.train_queries + fit.validation_queries == (np.bincount(query, weights=labels) > 0).sum()


@pytest.mark.parametrize("method", ["global_time", "per_user", "random"])
def test_a_window_is_scored_as_of_the_end_of_its_history(method: str) -> None:
    """Every protocol answers as of one moment: the cut (global time) or the end of the history (per user,
    random), as `recflow recommend` answers as of the end of its data; no history event is after it."""
    rows = [(u, f"i{j}", "view", 10 * k + j) for k, u in enumerate("abc") for j in range(10)]
    inter = encode_events(event_table(rows), ACTIONS)
    labels, cuts = assign_split(inter, SplitSettings(method=method, test_fraction=0.2, validation_fraction=0.0))
    win = window(Interactions(**{**inter.__dict__, "split": labels}), SPLIT_TEST, method, cuts)
    assert len(win.history) + len(win.target) == len(inter)
    assert np.all(win.ref_time == win.ref_time[0]), "one moment for every user"
    assert win.history.ts.max() < win.ref_time[0]
    if method == "global_time":  # the last 20% of all events, after one cut shared by every user
        assert win.history.ts.max() < win.target.ts.min() == win.ref_time[0]
    else:  # 2 of each user's 10 events: the last ones, or random ones
        assert np.bincount(win.target.user_idx).tolist() == [2, 2, 2]
        assert win.ref_time[0] == win.history.ts.max() + 1


def test_rerank_keeps_only_real_candidates_in_ranker_order() -> None:
    inter = encode_events(event_table([("a", f"i{j}", "view", j) for j in range(6)]), ACTIONS)
    ctx = build_context(inter, np.array([DAY0 + 7 * SECONDS_PER_DAY]), np.eye(6, dtype=np.float32), SETTINGS)
    names = feature_names(ACTIONS, SETTINGS.popularity_windows_days)
    items = np.array([[0, 1, 2, PAD]])
    scores = np.array([[3.0, 2.0, 1.0, -np.inf]], dtype=np.float32)
    candidates = als_candidates(items, scores)
    Xr, _, _ = candidate_features(ctx, np.array([0]), candidates)
    labels = np.array([0, 0, 1])
    booster = train_ranker(
        np.tile(Xr, (30, 1)), np.tile(labels, 30), np.repeat(np.arange(30), 3), names, SETTINGS
    ).booster
    top, top_scores = rerank(booster, ctx, np.array([0]), candidates, k=4)
    assert top[0, 0] == 2 and set(top[0, :3]) == {0, 1, 2} and top[0, 3] == PAD
    assert np.isneginf(top_scores[0, 3])
