"""The drift check's arithmetic, without running Evidently: windows cut back from the last event, popularity
buckets, and the aggregates of a tiny event set with known answers. Detection on generated data and the report
pair (Evidently runs) are in tests/integration/test_drift_detection.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pyarrow as pa
import pytest

from recflow.config import Settings
from recflow.constants import ACTION, ITEM_ID, TIMESTAMP, USER_ID
from recflow.ops.drift import _popularity_buckets, aggregates, drift_windows, event_frames

from ..factories import drift_frame

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def test_windows_are_cut_back_from_the_last_event() -> None:
    w = drift_windows(T0 + timedelta(days=40), Settings())
    assert w.end - w.current_start == timedelta(days=7) == w.current_start - w.reference_start
    assert w.reference_start - w.lookback_start == timedelta(days=14)
    assert w.end == T0 + timedelta(days=40, milliseconds=1)


def test_items_are_bucketed_by_their_share_of_the_lookback_events() -> None:
    counts = {"a": 50, "b": 30, "c": 10, "d": 10}
    items = pd.Series([i for i, n in counts.items() for _ in range(n)])
    assert _popularity_buckets(items, 4) == {"a": "pop01", "b": "pop03", "c": "pop04", "d": "pop04"}
    assert _popularity_buckets(pd.Series([], dtype=object), 4) == {}


def test_new_items_new_users_and_activity_have_known_answers() -> None:
    day = 86_400_000
    t = int(T0.timestamp() * 1000)
    rows = [("u1", "old", "view", t + 1 * day)] * 3  # lookback of the reference window
    rows += [("u1", "old", "view", t + 15 * day), ("u2", "fresh", "click", t + 16 * day)]  # reference window
    rows += [("u2", "fresh", "view", t + 17 * day)]
    rows += [("u2", "fresh", "view", t + 23 * day), ("u3", "brand", "purchase", t + 24 * day)]  # current window
    rows += [("u3", "brand", "view", t + 28 * day - 1)]
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
    windows = drift_windows(T0 + timedelta(days=28, milliseconds=-1), settings)
    frames = event_frames(events, windows, settings)
    ref, cur = frames["events"]
    assert list(ref["new_item"]) == ["no", "yes", "yes"] and list(ref["new_user"]) == ["no", "yes", "yes"]
    # the current window's lookback covers the reference window: "fresh" and u2 are known there, "brand" is not
    assert list(cur["new_item"]) == ["no", "yes", "yes"] and list(cur["new_user"]) == ["no", "yes", "yes"]
    assert list(cur["item_popularity"]) == ["pop01", "new", "new"]  # "fresh" drew 2 of the 3 lookback events
    assert sorted(frames["users"][1]["events"]) == [1.0, 2.0]
    summary = aggregates(frames)
    assert summary["current"]["share_new_items"] == pytest.approx(2 / 3, abs=1e-4)
    assert summary["reference"]["events_per_user"] == 1.5
