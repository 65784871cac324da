"""The drift check's arithmetic, without running Evidently: windows cut back from the last event, popularity
buckets, the aggregates of a tiny event set with known answers, and the permutation test's behaviour on windows
whose answer is known (same users' distribution, a planted shift, few users, lookbacks that differ by sampling).
Detection on generated data and the report pair (Evidently runs) are in tests/integration/test_drift_detection.py; on
real data in tests/model/test_drift_real_data.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from recflow.config import Settings
from recflow.constants import ACTION, ITEM_ID, TIMESTAMP, USER_ID
from recflow.ops.drift import (
    DRIFT,
    NOT_ENOUGH_DATA,
    FramePair,
    _popularity_buckets,
    aggregates,
    drift_windows,
    event_frames,
    judge,
)
from recflow.ops.drift_stats import permutation_test, summarize

from ..factories import drift_frame

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def test_windows_are_cut_back_from_the_last_event() -> None:
    w = drift_windows(T0 + timedelta(days=40), Settings())
    assert w.end - w.current_start == timedelta(days=7) == w.current_start - w.reference_start
    # the reference window's 14-day lookback ends a reference window (7 days) before it
    assert w.reference_start - w.lookback_start == timedelta(days=7 + 14)
    assert w.end == T0 + timedelta(days=40, milliseconds=1)


def test_items_are_bucketed_by_their_share_of_the_lookback_events() -> None:
    counts = {"a": 50, "b": 30, "c": 10, "d": 10}
    items = pd.Series([i for i, n in counts.items() for _ in range(n)])
    assert _popularity_buckets(items, 4) == {"a": "pop01", "b": "pop03", "c": "pop04", "d": "pop04"}
    assert _popularity_buckets(pd.Series([], dtype=object), 4) == {}


def test_new_items_new_users_and_activity_have_known_answers() -> None:
    # windows cut back from day 35: current [28, 35), reference [21, 28); each lookback is the 14 days that end 7 days
    # before its window: the reference's [0, 14), the current's [7, 21), which holds neither window
    day = 86_400_000
    t = int(T0.timestamp() * 1000)
    rows = [("u1", "old", "view", t + 1 * day)] * 3  # the reference's lookback only
    rows += [("u2", "mid", "view", t + 10 * day)] * 2  # both lookbacks
    rows += [("u4", "late", "click", t + 16 * day)]  # the current's lookback only
    rows += [("u1", "old", "view", t + 22 * day), ("u2", "late", "click", t + 23 * day)]  # reference window
    rows += [("u3", "mid", "view", t + 24 * day)]
    rows += [("u4", "late", "view", t + 29 * day), ("u3", "brand", "purchase", t + 30 * day)]  # current window
    rows += [("u5", "old", "view", t + 35 * day - 1)]
    events = drift_frame(
        pa.table(
            {
                USER_ID: [r[0] for r in rows],
                ITEM_ID: [r[1] for r in rows],
                ACTION: [r[2] for r in rows],
                TIMESTAMP: pa.array([r[3] for r in rows]).cast(pa.timestamp("ms", tz="UTC")),
            }
        )
    )
    settings = Settings().replace("drift", min_events=1)
    windows = drift_windows(T0 + timedelta(days=35, milliseconds=-1), settings)
    pair = event_frames(events, windows, settings)["events"]
    ref, cur = pair.reference, pair.current
    # reference against {old: 3, mid: 2} and users u1, u2: "old" drew the first 3/5, "mid" starts at 3/5 (pop07)
    assert list(ref["item_popularity"]) == ["pop01", "new", "pop07"] and list(ref["new_item"]) == ["no", "yes", "no"]
    assert list(ref["new_user"]) == ["no", "no", "yes"]
    # current against {mid: 2, late: 1} and users u2, u4: u3 was active in the reference window, yet is new here
    assert list(cur["item_popularity"]) == ["pop07", "new", "new"] and list(cur["new_item"]) == ["no", "yes", "yes"]
    assert list(cur["new_user"]) == ["no", "yes", "yes"]
    assert list(cur.index) == ["u4", "u3", "u5"]  # the unit the permutation null moves
    # the same rows as the other window reads them: where the null deals them
    assert pair.reference_as_current is not None and pair.current_as_reference is not None
    assert list(pair.reference_as_current["item_popularity"]) == ["new", "pop07", "pop01"]
    assert list(pair.reference_as_current["new_user"]) == ["yes", "no", "yes"]
    assert list(pair.current_as_reference["item_popularity"]) == ["new", "new", "pop01"]
    assert list(pair.current_as_reference["new_user"]) == ["yes", "yes", "yes"]
    frames = event_frames(events, windows, settings)
    assert sorted(frames["users"].current["events"]) == [1.0, 1.0, 1.0]
    summary = aggregates(frames)
    assert summary["current"]["share_new_items"] == pytest.approx(2 / 3, abs=1e-4)
    assert summary["reference"]["events_per_user"] == 1.0


def clustered_window(
    rng: np.random.Generator, users: int, *, click_shift: float = 0.0, offset: int = 0
) -> pd.DataFrame:
    """Events of `users` users whose tastes differ a lot (so events of one user are not independent draws): each
    user clicks with their own probability and has their own typical value."""
    sizes = rng.integers(5, 150, users)
    user = np.repeat(np.arange(users) + offset, sizes)
    taste = rng.normal(size=users)[user - offset]
    click = rng.random(len(user)) < np.clip(0.3 + 0.25 * np.sign(taste) + click_shift, 0, 1)
    frame = pd.DataFrame({"action": np.where(click, "click", "view"), "value": rng.normal(taste)})
    return frame.set_index(pd.Index(user.astype(str)))


def test_two_random_groups_of_the_same_users_do_not_drift_however_clustered_their_events() -> None:
    # 45 users a window and ~3,500 events: a chi-square test on events would flag most of these splits
    rng = np.random.default_rng(0)
    flagged = 0
    for seed in range(20):
        columns = permutation_test(
            clustered_window(rng, 45),
            clustered_window(rng, 45, offset=1000),
            alpha=0.01,
            min_effect={},
            permutations=500,
            bins=16,
            seed=seed,
        )
        flagged += any(c.drifted for c in columns)
    assert flagged <= 1


def test_a_planted_shift_is_flagged_with_its_size_and_the_null_widens_for_few_users() -> None:
    rng = np.random.default_rng(1)
    big = permutation_test(
        clustered_window(rng, 400),
        clustered_window(rng, 400, click_shift=0.15, offset=1000),
        alpha=0.01,
        min_effect={},
        permutations=500,
        bins=16,
        seed=0,
    )
    action, value = big
    assert action.drifted and not value.drifted
    assert action.score > action.critical and action.p_value < 0.01
    assert "click" in action.reference and "click" in action.current  # the summaries name what moved
    small = permutation_test(
        clustered_window(rng, 20),
        clustered_window(rng, 20, offset=1000),
        alpha=0.01,
        min_effect={},
        permutations=500,
        bins=16,
        seed=0,
    )
    assert small[0].null_median > 2 * action.null_median  # fewer users: random splits differ more


def test_a_floor_keeps_a_significant_but_negligible_move_from_drifting() -> None:
    rng = np.random.default_rng(2)
    reference = clustered_window(rng, 3000)
    current = clustered_window(rng, 3000, click_shift=0.02, offset=10_000)
    kwargs = {"alpha": 0.01, "permutations": 300, "bins": 16, "seed": 0}
    (action, _) = permutation_test(reference, current, min_effect={}, **kwargs)
    (floored, _) = permutation_test(reference, current, min_effect={"action": 0.03}, **kwargs)
    assert action.drifted and action.score < 0.03
    assert not floored.drifted and floored.critical == 0.03


def test_windows_with_too_few_users_get_not_enough_data_with_their_sizes_never_drift() -> None:
    rng = np.random.default_rng(3)
    reference = clustered_window(rng, 10)
    current = clustered_window(rng, 10, click_shift=0.5, offset=100)
    frames = {
        "events": (reference, current),
        "users": (
            reference.groupby(level=0).size().to_frame("events"),
            current.groupby(level=0).size().to_frame("events"),
        ),
    }
    frames = {name: FramePair(reference, current) for name, (reference, current) in frames.items()}
    status, reasons, datasets = judge(frames, Settings())
    assert status == NOT_ENOUGH_DATA and datasets == []
    assert "holds 10 users" in reasons[0] and "drift.min_users" in reasons[0]
    status, reasons, _ = judge(frames, Settings().replace("drift", min_users=5, min_events=10, permutations=300))
    assert status == DRIFT and reasons[0].startswith("events: action jensenshannon")


def shares_window(light_share: float, heavy_share: float, *, offset: int) -> pd.DataFrame:
    """40 light users with 20 events each and 2 heavy users with 400 each; `light_share` / `heavy_share` of each
    user's events are on new items."""
    rows = []
    for user, (events, share) in enumerate([(20, light_share)] * 40 + [(400, heavy_share)] * 2):
        new = round(events * share)
        rows += [(str(user + offset), "yes" if i < new else "no") for i in range(events)]
    frame = pd.DataFrame(rows, columns=[USER_ID, "new_item"])
    return frame.set_index(USER_ID)


def test_every_user_weighs_the_same_so_two_heavy_users_cannot_hide_what_the_others_moved() -> None:
    # regression: with the events pooled, ml-100k's five-months-later week was missed when a few heavy raters held
    # the reference week's new-item share; here pooled shares are equal (22.5% in both windows), the users' are not
    reference = shares_window(0.05, 0.4, offset=0)
    current = shares_window(0.2, 0.25, offset=1000)
    assert (reference["new_item"] == "yes").mean() == (current["new_item"] == "yes").mean() == 0.225
    (column,) = permutation_test(reference, current, alpha=0.01, min_effect={}, permutations=500, bins=16, seed=0)
    assert column.drifted and column.p_value < 0.01
    assert column.reference == "yes 6.7%, no 93.3%" and column.current == "yes 20.2%, no 79.8%"


def test_numbers_are_summarised_with_every_user_weighing_the_same() -> None:
    values = pd.Series([1.0] * 9 + [10.0], index=pd.Index(["heavy"] * 9 + ["light"]))
    assert summarize(values, values)[0] == "mean 5.5, median 1, p90 10"


def items_window(rng: np.random.Generator, users: int, *, offset: int, moved: float = 0.0) -> pd.Series:
    """The items of `users` users' events (30 each, index: the user), drawn from one catalogue of 200 items with a
    power-law popularity; `moved` of each user's events go to items 150-199 instead."""
    weights = 1.0 / np.arange(1, 201)
    picks = rng.choice(200, size=(users, 30), p=weights / weights.sum())
    to_tail = rng.random((users, 30)) < moved
    picks[to_tail] = rng.integers(150, 200, int(to_tail.sum()))
    user = np.repeat(np.arange(users) + offset, 30).astype(str)
    return pd.Series(picks.ravel(), index=pd.Index(user))


def read_against(items: pd.Series, known: int) -> pd.DataFrame:
    """new_item as a lookback that holds items 0 .. known-1 reads it."""
    return pd.DataFrame({"new_item": np.where(items.to_numpy() >= known, "yes", "no")}, index=items.index)


def test_lookbacks_that_differ_by_sampling_alone_are_in_the_null_and_a_real_move_still_drifts() -> None:
    # regression (#13): each window's new items are read against its own lookback, and two lookbacks of one
    # population hold different items by sampling alone. Here the users behave the same in both windows, but the
    # reference's lookback holds items 0-99 and the current's 0-149: the new-item share is ~12% against ~5%.
    rng = np.random.default_rng(4)
    reference, current = items_window(rng, 60, offset=0), items_window(rng, 60, offset=1000)
    kwargs = {"alpha": 0.01, "min_effect": {}, "permutations": 500, "bins": 16, "seed": 0}
    as_read = read_against(reference, 100), read_against(current, 150)
    # keeping each row's own reading, the null never sees the lookbacks' difference and flags it
    (kept,) = permutation_test(*as_read, **kwargs)
    assert kept.drifted and kept.p_value < 0.01
    # dealt with the reading of the window it lands in, every re-deal holds that difference, as the windows do
    swapped = {"reference_as_current": read_against(reference, 150), "current_as_reference": read_against(current, 100)}
    (dealt,) = permutation_test(*as_read, **swapped, **kwargs)
    assert not dealt.drifted and dealt.p_value > 0.1
    assert dealt.null_median > 5 * kept.null_median  # the null is centred on the lookbacks' difference
    # a real move of the current window's users (30% of their events to items 150-199: ~33% new) still drifts
    moved = items_window(rng, 60, offset=1000, moved=0.3)
    (real,) = permutation_test(
        read_against(reference, 100),
        read_against(moved, 150),
        reference_as_current=read_against(reference, 150),
        current_as_reference=read_against(moved, 100),
        **kwargs,
    )
    assert real.drifted and real.p_value < 0.01


def test_the_other_windows_reading_must_be_of_the_same_rows() -> None:
    rng = np.random.default_rng(5)
    reference, current = items_window(rng, 10, offset=0), items_window(rng, 10, offset=100)
    with pytest.raises(ValueError, match="current window's rows as the other window reads them"):
        permutation_test(
            read_against(reference, 100),
            read_against(current, 150),
            reference_as_current=read_against(reference, 150),
            current_as_reference=read_against(current.iloc[1:], 100),
            alpha=0.01,
            min_effect={},
            permutations=99,
            bins=16,
            seed=0,
        )
