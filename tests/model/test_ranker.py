"""The ranker learns a known order, grades labels by the strongest action, and sees no future."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from recflow.config import RankerSettings
from recflow.features import SECONDS_PER_DAY, encode_events
from recflow.metrics import PAD
from recflow.ranker import (
    action_grades,
    build_context,
    candidate_features,
    feature_names,
    grade_labels,
    rerank,
    train_ranker,
)

ACTIONS = ("view", "click", "add_to_cart", "purchase")
DAY0 = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp())
SETTINGS = RankerSettings(n_estimators=60, min_child_samples=5, early_stopping_rounds=20)


def table(rows: list[tuple[str, str, str, float]]) -> pa.Table:
    users, items, actions, days = zip(*rows, strict=True)
    stamps = [int((DAY0 + d * SECONDS_PER_DAY) * 1000) for d in days]
    return pa.table(
        {
            "user_id": list(users),
            "item_id": list(items),
            "action": list(actions),
            "timestamp": pa.array(stamps, pa.timestamp("ms", tz="UTC")),
        }
    )


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
        table([("a", "x", "view", 1), ("a", "x", "purchase", 2), ("a", "y", "click", 3), ("b", "x", "view", 4)]),
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
        table([("a", "x", "view", 0), ("b", "x", "view", 5), ("c", "x", "view", 9.5), ("c", "y", "view", 9.9)]),
        ACTIONS,
    )
    ref = np.array([DAY0 + 10 * SECONDS_PER_DAY, DAY0 + 6 * SECONDS_PER_DAY, DAY0 + 10 * SECONDS_PER_DAY])
    ctx = build_context(inter, ref, np.eye(2, dtype=np.float32), RankerSettings(popularity_windows_days=(1, 7)))
    names = feature_names(ACTIONS, (1, 7))
    X, row_user, _ = candidate_features(ctx, np.array([0, 1]), np.array([[0, 1], [0, PAD]]), np.ones((2, 2)))
    features = {name: X[:, i] for i, name in enumerate(names)}
    assert row_user.tolist() == [0, 0, 1]
    # user a at day 10: x was seen at days 0, 5 and 9.5 -> 1 in the last day, 2 in the last week, 3 in all
    assert features["item_pop_1d"][0] == 1 and features["item_pop_7d"][0] == 2 and features["item_pop_all"][0] == 3
    # user b at day 6 must not see the views of days 9.5 and 9.9
    assert features["item_pop_7d"][2] == 2 and features["item_pop_all"][2] == 2
    assert features["item_age_days"][2] == 6
    # user a's last item is x, so candidate x is identical to it and y orthogonal
    assert features["sim_last_item"][0] == 1 and features["sim_last_item"][1] == 0


def test_rerank_keeps_only_real_candidates_in_ranker_order() -> None:
    inter = encode_events(table([("a", f"i{j}", "view", j) for j in range(6)]), ACTIONS)
    ctx = build_context(inter, np.array([DAY0 + 7 * SECONDS_PER_DAY]), np.eye(6, dtype=np.float32), SETTINGS)
    names = feature_names(ACTIONS, SETTINGS.popularity_windows_days)
    items = np.array([[0, 1, 2, PAD]])
    scores = np.array([[3.0, 2.0, 1.0, -np.inf]], dtype=np.float32)
    Xr, _, _ = candidate_features(ctx, np.array([0]), items, scores)
    labels = np.array([0, 0, 1])
    booster = train_ranker(
        np.tile(Xr, (30, 1)), np.tile(labels, 30), np.repeat(np.arange(30), 3), names, SETTINGS
    ).booster
    top, top_scores = rerank(booster, ctx, np.array([0]), items, scores, k=4)
    assert top[0, 0] == 2 and set(top[0, :3]) == {0, 1, 2} and top[0, 3] == PAD
    assert np.isneginf(top_scores[0, 3])
