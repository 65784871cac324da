"""The drift check on real windows (ml-100k, read from ../shared/data at run time; skipped when absent): random
user splits of five weeks do not drift, planted drifts of the README's sizes do, and the current week taken five
months later drifts by the columns that moved (new items, popularity), not by activity. The full calibration (200
splits, 40 per planted size, YooChoose too) is benchmarks/bench_drift_real.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recflow.config import Settings, load_settings
from recflow.ops import drift_calibration as dc
from recflow.ops.drift import DRIFT, NOT_ENOUGH_DATA, drift_windows, event_frames, judge

from ..conftest import REPO

DAY_MS = 86_400_000
SHIPPED = load_settings(REPO / "params.yaml").replace("drift", permutations=1000)


@pytest.fixture(scope="module")
def ratings() -> pd.DataFrame:
    folder = REPO.parent / "shared" / "data" / "ml-100k"
    if not (folder / "u.data").exists():
        pytest.skip(f"MovieLens 100K not found at {folder} (it is never part of the repo)")
    return dc.read_movielens(folder)


SPAN, SLOT = 35, 7  # days: five weekly slots (the reference week's 2-week lookback, the week before it, the two weeks)


def verdict(case: dc.Case) -> tuple[str, set[str]]:
    frames = event_frames(case.events, drift_windows(case.end, case.settings), case.settings)
    status, _, datasets = judge(frames, case.settings)
    return status, {f"{d.name}.{c.column}" for d in datasets for c in d.columns if c.drifted}


def month_split(ratings: pd.DataFrame, seed: int, settings: Settings = SHIPPED) -> dc.Case:
    rng = np.random.default_rng(seed)
    first = int(ratings["ts"].min())
    return dc.no_drift_case(ratings, first + (30 + 10 * seed) * DAY_MS, SPAN, SLOT, settings, rng)


def test_random_user_groups_of_five_weeks_drift_at_most_once_in_twenty(ratings: pd.DataFrame) -> None:
    # the target; the check's rate is about 2% (README), so 20 splits allow one
    verdicts = [verdict(month_split(ratings, seed)) for seed in range(20)]
    assert sum(status == DRIFT for status, _ in verdicts) <= 1, verdicts


@pytest.mark.parametrize(("kind", "size"), [("new_items", 0.1), ("popularity", 0.3), ("action_mix", 0.4)])
def test_planted_drifts_of_the_stated_sizes_are_flagged_by_their_column(
    ratings: pd.DataFrame, kind: str, size: float
) -> None:
    column = {"new_items": "events.new_item", "popularity": "events.item_popularity", "action_mix": "events.action"}
    for seed in range(3):
        case = month_split(ratings, seed)
        status, columns = verdict(dc.PLANTS[kind](case, size, np.random.default_rng(seed)))
        assert status == DRIFT and column[kind] in columns, (seed, columns)


# day 0: the first month; days 15, 26 and 34: months whose reference week's new-item share was held by a few heavy
# raters, so that with events pooled (before every user weighed the same) the five-months-later week was not flagged
# (in the four-slot layout of 28-day spans used then)
@pytest.mark.parametrize("day", [0, 15, 26, 34])
def test_five_months_later_drifts_by_new_items_and_popularity(ratings: pd.DataFrame, day: int) -> None:
    start = int(ratings["ts"].min()) + day * DAY_MS
    case = dc.later_case(ratings, start, start + 150 * DAY_MS, SPAN, SLOT, SHIPPED, np.random.default_rng(day))
    frames = event_frames(case.events, drift_windows(case.end, case.settings), case.settings)
    status, reasons, datasets = judge(frames, case.settings)
    moved = {c.column: c for d in datasets for c in d.columns if d.name == "events"}
    assert status == DRIFT and moved["new_item"].drifted and moved["item_popularity"].drifted, reasons
    assert not moved["action"].drifted and not moved["new_user"].drifted
    # the users of ml-100k's first month rated far more a week than later ones (median ~100 against ~20): when the
    # users data set drifts here, it is that real move, and its reason says so with both medians
    users = frames["users"]
    if any(d.drifted for d in datasets if d.name == "users"):
        assert users.reference["events"].median() > 2 * users.current["events"].median()


def test_a_week_of_few_users_is_not_enough_data_never_drift(ratings: pd.DataFrame) -> None:
    status, columns = verdict(month_split(ratings, 0, SHIPPED.replace("drift", min_users=500)))
    assert status == NOT_ENOUGH_DATA and not columns
