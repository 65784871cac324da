from __future__ import annotations

import numpy as np
import pytest

from recflow.config import SplitSettings
from recflow.errors import EmptyDataError, UnknownActionError
from recflow.model.features import (
    PRODUCTION,
    SPLIT_FIT,
    SPLIT_TEST,
    SPLIT_VALIDATION,
    Interactions,
    assign_split,
    confidence_matrix,
    encode_events,
    load_interactions,
    save_interactions,
    window,
)

from ..factories import ACTIONS, event_table


def test_encode_sorts_by_time_and_numbers_ids_by_first_appearance() -> None:
    inter = encode_events(
        event_table([("b", "y", "click", 2), ("a", "x", "view", 1), ("b", "x", "purchase", 3)]), ACTIONS
    )
    assert list(inter.user_ids) == ["a", "b"]
    assert list(inter.item_ids) == ["x", "y"]
    assert inter.user_idx.tolist() == [0, 1, 1]
    assert inter.item_idx.tolist() == [0, 1, 0]
    assert [ACTIONS[a] for a in inter.action_idx] == ["view", "click", "purchase"]
    assert np.all(np.diff(inter.ts) > 0)


def test_encode_refuses_actions_params_do_not_know() -> None:
    with pytest.raises(UnknownActionError, match=r"'like'.*events\.actions"):
        encode_events(event_table([("a", "x", "like", 1)]), ACTIONS)


def test_encode_empty_store_says_what_to_do() -> None:
    with pytest.raises(EmptyDataError, match="recflow ingest"):
        encode_events(event_table([("a", "x", "view", 1)]).slice(0, 0), ACTIONS)


def _many(n_users: int, per_user: int) -> Interactions:
    rows = [(f"u{u}", f"i{(u + e) % 7}", "view", u + e * 10) for u in range(n_users) for e in range(per_user)]
    return encode_events(event_table(rows), ACTIONS)


def test_global_split_is_by_time_and_roughly_the_asked_shares() -> None:
    inter = _many(20, 10)
    labels, cuts = assign_split(inter, SplitSettings("global_time", test_fraction=0.2, validation_fraction=0.25))
    for earlier, later in ((SPLIT_FIT, SPLIT_VALIDATION), (SPLIT_VALIDATION, SPLIT_TEST)):
        assert inter.ts[labels == earlier].max() < inter.ts[labels == later].min()
    assert inter.ts[labels == SPLIT_TEST].min() == cuts["test_start"]
    assert abs((labels == SPLIT_TEST).mean() - 0.2) < 0.05
    assert abs((labels == SPLIT_VALIDATION).sum() / (labels != SPLIT_TEST).sum() - 0.25) < 0.05


def test_per_user_split_takes_each_users_last_events() -> None:
    inter = _many(6, 10)
    labels, _ = assign_split(inter, SplitSettings("per_user", test_fraction=0.2, validation_fraction=0.25))
    for user in range(inter.n_users):
        mine = labels[inter.user_idx == user]  # in time order
        assert mine.tolist() == [SPLIT_FIT] * 6 + [SPLIT_VALIDATION] * 2 + [SPLIT_TEST] * 2


def test_window_reference_times_leave_the_target_in_the_future() -> None:
    inter = _many(6, 10)
    for method in ("global_time", "per_user"):
        labels, cuts = assign_split(inter, SplitSettings(method, 0.2, 0.25))
        split = Interactions(**{**inter.__dict__, "split": labels})
        for target in (SPLIT_VALIDATION, SPLIT_TEST):
            win = window(split, target, method, cuts)
            assert np.all(win.history.ts < win.ref_time[win.history.user_idx] + 1e-9)
            assert np.all(win.target.ts >= win.ref_time[win.target.user_idx] - 1e-9)
        production = window(split, PRODUCTION, method, cuts)
        assert len(production.history) == len(inter) and len(production.target) == 0


def test_confidence_is_weight_times_half_life_decay_summed() -> None:
    inter = encode_events(
        event_table([("a", "x", "purchase", 0), ("a", "x", "view", 10), ("a", "y", "click", 10)]), ACTIONS
    )
    weights = np.array([0.5, 1.0, 1.5, 2.0])
    matrix = confidence_matrix(inter, weights, half_life_days=10.0)
    # the purchase is one half-life before the user's last event: 2.0 * 0.5, plus a fresh view 0.5
    assert matrix[0, 0] == pytest.approx(1.5)
    assert matrix[0, 1] == pytest.approx(1.0)
    assert matrix.nnz == 2
    assert np.allclose(confidence_matrix(inter, weights, 0).toarray(), [[2.5, 1.0]]), "half-life 0: no decay"


def test_decay_runs_back_from_each_users_last_event_so_a_dormant_user_keeps_their_history() -> None:
    """Regression (issue 10): a half-life measured from the global "now" erased the rows of users who had been
    away; measured from each user's own last event, a dormant user's row is the row of an active one."""
    rows = [("active", "x", "view", 90), ("active", "y", "view", 100), ("dormant", "x", "view", 0)]
    rows.append(("dormant", "y", "view", 10))
    inter = encode_events(event_table(rows), ACTIONS)
    matrix = confidence_matrix(inter, np.ones(4), half_life_days=10.0).toarray()
    assert np.allclose(matrix[0], matrix[1]) and np.allclose(matrix[0], [0.5, 1.0])


def test_interactions_round_trip(tmp_path) -> None:
    inter = _many(3, 4)
    save_interactions(inter, tmp_path, {"actions": list(ACTIONS), "cuts": {}, "summary": {"method": "per_user"}})
    loaded, meta = load_interactions(tmp_path)
    assert meta["summary"]["method"] == "per_user"
    for name in ("user_idx", "item_idx", "action_idx", "ts", "split"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(inter, name))
    assert list(loaded.user_ids) == list(inter.user_ids)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_of_users_keeps_those_users_events_reindexed_and_every_item() -> None:
    inter = encode_events(
        event_table([("a", "x", "view", 0), ("b", "y", "click", 5), ("c", "x", "purchase", 7), ("b", "z", "view", 9)]),
        ACTIONS,
    )
    b, c = (int(np.flatnonzero(inter.user_ids == u)[0]) for u in ("b", "c"))
    sample = inter.of_users(np.sort(np.array([b, c])))
    assert sample.n_users == 2 and sample.n_items == inter.n_items
    assert list(sample.user_ids[sample.user_idx]) == ["b", "c", "b"]  # in time order, as the data was
    assert list(sample.item_ids[sample.item_idx]) == ["y", "x", "z"]
    assert list((sample.ts - inter.ts[0]) // 86_400) == [5, 7, 9]  # days after "a"'s event, the first
    assert [sample.actions[a] for a in sample.action_idx] == ["click", "purchase", "view"]
