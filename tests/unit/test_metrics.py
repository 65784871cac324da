from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from recflow.model.metrics import (
    PAD,
    bootstrap_interval,
    grouped_bootstrap_interval,
    hits,
    paired_standard_error,
    ranking_metrics,
    recall_curve,
)


def relevant(rows: list[list[int]], n_items: int = 10) -> sp.csr_matrix:
    data = [(r, i) for r, items in enumerate(rows) for i in items]
    r, c = zip(*data, strict=True)
    return sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(rows), n_items))


def test_known_answers_for_one_user() -> None:
    recs = np.array([[3, 1, 7, 2]])
    truth = relevant([[1, 2, 9]])
    m = ranking_metrics(recs, truth, k=4, recall_k=4, n_catalogue=10)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@4"] == pytest.approx(dcg / idcg)
    assert m["recall@4"] == pytest.approx(2 / 3)
    assert m["hit_rate@4"] == 1.0
    assert m["map@4"] == pytest.approx((1 / 2 + 2 / 4) / 3)
    assert m["coverage@4"] == pytest.approx(4 / 10)


def test_perfect_and_empty_rankings() -> None:
    truth = relevant([[0, 1], [2]])
    perfect = ranking_metrics(np.array([[0, 1, 5], [2, 5, 6]]), truth, k=3, recall_k=3, n_catalogue=10)
    assert perfect["ndcg@3"] == pytest.approx(1.0) and perfect["map@3"] == pytest.approx(1.0)
    padded = ranking_metrics(np.full((2, 3), PAD), truth, k=3, recall_k=3, n_catalogue=10)
    assert padded["ndcg@3"] == 0.0 and padded["coverage@3"] == 0.0


def test_padding_never_counts_as_a_hit_even_for_item_zero() -> None:
    assert not hits(np.array([[PAD, PAD]]), relevant([[0]])).any()


def test_recall_curve_is_monotone() -> None:
    curve = recall_curve(np.array([[4, 0, 1, 2]]), relevant([[0, 2]]), (1, 2, 3, 4))
    assert list(curve.values()) == [0.0, 0.5, 0.5, 1.0]


def test_too_few_recommendations_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least 20"):
        ranking_metrics(np.zeros((1, 10), dtype=int), relevant([[0]]), k=10, recall_k=20, n_catalogue=10)


def test_a_grouped_interval_is_of_the_combined_statistic_not_of_the_pooled_users() -> None:
    """Two folds of very different size and level, combined with equal weight: the pooled mean (0.9) lies
    outside the interval of the equal-weight mean (0.5), which must hold it."""
    small, large = np.zeros(20), np.ones(180)
    low, high = grouped_bootstrap_interval([small, large], lambda means: float(means.mean()), 200, seed=1)
    assert low == high == 0.5
    noisy = np.r_[np.zeros(50), np.ones(50)]
    low, high = grouped_bootstrap_interval([noisy, large], lambda means: float(means.mean()), 500, seed=1)
    assert low < 0.75 < high and high < 0.9


def test_one_group_is_the_plain_bootstrap_of_the_mean() -> None:
    values = np.random.default_rng(0).random(300)
    assert bootstrap_interval(values, 300, seed=2) == grouped_bootstrap_interval(
        [values], lambda m: float(m[0]), 300, 2
    )
    low, high = bootstrap_interval(values, 300, seed=2)
    assert low < values.mean() < high


def test_the_paired_standard_error_is_of_the_per_user_difference() -> None:
    """Known answers: the standard error of the mean per-user difference, not of either mean alone."""
    production = np.array([1.0, 0.0, 1.0, 0.0])
    candidate = np.array([1.0, 0.0, 0.0, 0.0])  # one user lost: difference (0, 0, 1, 0)
    assert paired_standard_error(production, candidate) == pytest.approx(np.sqrt(0.25 / 4))
    shifted = production - 0.1  # the same users, each 0.1 lower: the window can tell them apart exactly
    assert paired_standard_error(production, shifted) == pytest.approx(0.0)
    assert paired_standard_error(np.array([0.3]), np.array([0.1])) == 0.0
