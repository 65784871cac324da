"""The synthetic generator: deterministic, exact, and with the structure a recommender should find."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from recflow.config import GenerateSettings
from recflow.errors import ConfigError
from recflow.events.contract import EVENT_SCHEMA
from recflow.events.synth import DriftSpec, generate_events, item_catalogue

SMALL = GenerateSettings(seed=3, users=400, items=300, events=40_000, days=30, groups=6)
START = datetime(2024, 1, 1, tzinfo=UTC)


def frame(table: pa.Table, settings: GenerateSettings = SMALL, drift: DriftSpec | None = None) -> pd.DataFrame:
    """Events as pandas, with each item's hidden group and release time from the catalogue."""
    df = table.to_pandas()
    catalogue = item_catalogue(settings, drift=drift).to_pandas().set_index("item_id")
    df["group"] = df["item_id"].map(catalogue["group"])
    df["release"] = df["item_id"].map(catalogue["release"])
    df["drift_only"] = df["item_id"].map(catalogue["drift_only"])
    return df


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    return frame(generate_events(SMALL))


@pytest.fixture(scope="module")
def drifted() -> pd.DataFrame:
    return frame(generate_events(SMALL, drift=DriftSpec()), drift=DriftSpec())


def halves(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    middle = pd.Timestamp(START + timedelta(days=SMALL.days / 2))
    return df[df["timestamp"] < middle], df[df["timestamp"] >= middle]


def item_distance(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """Total variation distance between the item distributions of two windows."""
    both = pd.concat([a["item_id"].value_counts(normalize=True), b["item_id"].value_counts(normalize=True)], axis=1)
    return 0.5 * float(both.fillna(0.0).diff(axis=1).iloc[:, 1].abs().sum())


def test_same_seed_gives_identical_tables_and_another_seed_does_not() -> None:
    first, second = generate_events(SMALL), generate_events(SMALL)
    assert first.equals(second)
    sink = [pa.BufferOutputStream(), pa.BufferOutputStream()]
    for table, out in zip((first, second), sink, strict=True):
        with pa.ipc.new_stream(out, table.schema) as writer:
            writer.write_table(table)
    assert sink[0].getvalue() == sink[1].getvalue()
    other = generate_events(dataclasses.replace(SMALL, seed=SMALL.seed + 1))
    assert not first.equals(other)


@pytest.mark.parametrize("n_events", [1, 2, 7, 1000, 12_345])
def test_exactly_the_requested_number_of_events(n_events: int) -> None:
    settings = GenerateSettings(seed=1, users=50, items=40, events=n_events, days=3, groups=4)
    assert generate_events(settings).num_rows == n_events


def test_tiny_catalogue_with_more_groups_than_items() -> None:
    table = generate_events(GenerateSettings(seed=1, users=1, items=1, events=50, days=1, groups=12))
    assert table.num_rows == 50
    assert set(table.column("item_id").to_pylist()) == {"i00000"}
    assert set(table.column("user_id").to_pylist()) == {"u000000"}


def test_schema_ids_and_time_range(events: pd.DataFrame) -> None:
    table = generate_events(SMALL)
    assert table.schema.equals(EVENT_SCHEMA)
    assert "event_id" not in table.column_names
    assert events["user_id"].str.fullmatch(r"u\d{6}").all()
    assert events["item_id"].str.fullmatch(r"i\d{5}").all()
    assert set(events["action"]) == {"view", "click", "add_to_cart", "purchase"}
    assert events["timestamp"].min() >= pd.Timestamp(START)
    assert events["timestamp"].max() < pd.Timestamp(START + timedelta(days=SMALL.days))
    assert events["timestamp"].is_monotonic_increasing
    # events fill the whole range, not just a corner of it
    assert events["timestamp"].dt.floor("D").nunique() == SMALL.days
    # most events are views; value is a quantity on purchases and null elsewhere
    shares = events["action"].value_counts(normalize=True)
    assert shares["view"] > 0.5 > shares["click"] > shares["add_to_cart"] > shares["purchase"] > 0.01
    assert events.loc[events["action"] == "purchase", "value"].ge(1).all()
    assert events.loc[events["action"] != "purchase", "value"].isna().all()


def test_every_user_has_events(events: pd.DataFrame) -> None:
    assert events["user_id"].nunique() == SMALL.users


def test_custom_start_shifts_time_and_naive_start_is_rejected() -> None:
    later = datetime(2025, 6, 1, tzinfo=UTC)
    shifted = generate_events(SMALL, start=later)
    base = generate_events(SMALL)
    delta = pc.subtract(shifted.column("timestamp"), base.column("timestamp")).to_pandas()
    assert (delta == pd.Timedelta(later - START)).all()
    with pytest.raises(ConfigError, match="time zone"):
        generate_events(SMALL, start=datetime(2024, 1, 1))


def test_invalid_settings_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"generate\.users"):
        generate_events(GenerateSettings(users=0))


@pytest.mark.parametrize(
    ("earlier", "later"), [("view", "click"), ("click", "add_to_cart"), ("add_to_cart", "purchase")]
)
def test_each_funnel_step_follows_the_previous_step_on_the_same_item_in_the_same_session(
    events: pd.DataFrame, earlier: str, later: str
) -> None:
    steps = events[events["action"] == later].sort_values("timestamp")
    before = events[events["action"] == earlier].sort_values("timestamp")
    matched = pd.merge_asof(
        steps,
        before[["user_id", "item_id", "timestamp"]].rename(columns={"timestamp": "before"}),
        left_on="timestamp",
        right_on="before",
        by=["user_id", "item_id"],
        allow_exact_matches=False,
        tolerance=pd.Timedelta(minutes=3),
    )
    assert len(steps) > 100
    assert matched["before"].notna().all()


def test_users_act_in_bursts(events: pd.DataFrame) -> None:
    gaps = events.sort_values(["user_id", "timestamp"]).groupby("user_id")["timestamp"].diff().dropna()
    assert gaps.median() < pd.Timedelta(minutes=5)  # within sessions
    assert (gaps > pd.Timedelta(hours=1)).mean() > 0.05  # and between them


def test_no_item_has_events_before_its_release(events: pd.DataFrame, drifted: pd.DataFrame) -> None:
    for df in (events, drifted):
        assert (df["timestamp"] >= df["release"]).all()
    released_late = events[events["release"] > pd.Timestamp(START) + pd.Timedelta(days=5)]
    assert released_late["item_id"].nunique() > 10  # items do appear over time


def test_fresh_items_are_hot(events: pd.DataFrame) -> None:
    fresh = events[events["release"] >= pd.Timestamp(START)]
    age = (fresh["timestamp"] - fresh["release"]) / pd.Timedelta(days=SMALL.days)
    assert (age < 0.1).sum() > 2 * ((age >= 0.3) & (age < 0.4)).sum()


def test_users_concentrate_in_their_taste_groups(events: pd.DataFrame) -> None:
    top_share = events.groupby("user_id")["group"].agg(lambda g: g.value_counts(normalize=True).iloc[0])
    assert top_share.mean() > max(0.6, 3 / SMALL.groups)


def test_item_popularity_and_user_activity_are_heavy_tailed(events: pd.DataFrame) -> None:
    items = events["item_id"].value_counts()
    assert items.iloc[: len(items) // 10].sum() / items.sum() > 0.4
    users = events["user_id"].value_counts()
    assert users.iloc[: len(users) // 10].sum() / users.sum() > 0.25


def test_a_users_taste_group_predicts_future_items_better_than_popularity(events: pd.DataFrame) -> None:
    """Precision@10 on a time split, excluding items the user already had, as the evaluation does."""
    cut = events["timestamp"].quantile(0.8)
    train, test = events[events["timestamp"] < cut], events[events["timestamp"] >= cut]
    popular = list(train["item_id"].value_counts().index)
    group_popular = train.groupby("group")["item_id"].agg(lambda items: list(items.value_counts().index))
    user_group = train.groupby("user_id")["group"].agg(lambda groups: groups.value_counts().index[0])
    seen = train.groupby("user_id")["item_id"].agg(set)
    future = test.groupby("user_id")["item_id"].agg(set)
    users = future.index.intersection(seen.index)

    def precision(ranking: list[str], user: str) -> float:
        top = [item for item in ranking if item not in seen[user]][:10]
        return len(future[user].intersection(top)) / 10

    by_popularity = np.mean([precision(popular, user) for user in users])
    by_group = np.mean([precision(group_popular[user_group[user]], user) for user in users])
    assert by_group > 2 * by_popularity > 0


def test_without_drift_the_two_halves_look_alike(events: pd.DataFrame) -> None:
    first, second = halves(events)
    mix = pd.concat(
        [first["action"].value_counts(normalize=True), second["action"].value_counts(normalize=True)], axis=1
    )
    assert mix.diff(axis=1).iloc[:, 1].abs().max() < 0.02
    assert item_distance(first, second) < 0.3


def test_drift_changes_action_mix_popularity_and_brings_new_items(events: pd.DataFrame, drifted: pd.DataFrame) -> None:
    first, second = halves(drifted)
    views = [window["action"].eq("view").mean() for window in (first, second)]
    assert views[1] - views[0] > 0.1  # fewer conversions after the drift
    base_first, base_second = halves(events)
    assert item_distance(first, second) > item_distance(base_first, base_second) + 0.2
    assert not first["drift_only"].any()
    assert second["drift_only"].mean() == pytest.approx(DriftSpec().new_items_share, abs=0.03)


def test_drift_start_fraction_moves_the_change_point() -> None:
    late = DriftSpec(start_fraction=0.8, popularity_shift=0.0, new_items_share=0.0, action_mix_shift=0.9)
    df = frame(generate_events(SMALL, drift=late), drift=late)
    position = (df["timestamp"] - pd.Timestamp(START)) / pd.Timedelta(days=SMALL.days)
    views = df["action"].eq("view")
    assert views[position < 0.75].mean() < 0.75 < views[position > 0.85].mean()


def test_drift_spec_values_are_checked() -> None:
    with pytest.raises(ConfigError, match="start_fraction"):
        DriftSpec(start_fraction=1.5)


def test_progress_reports_each_stage() -> None:
    calls: list[tuple[int, int]] = []
    generate_events(SMALL, progress=lambda done, total: calls.append((done, total)))
    assert [done for done, _ in calls] == list(range(1, calls[-1][1] + 1))
