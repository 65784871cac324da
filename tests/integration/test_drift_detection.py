"""The drift check: windows, aggregates with known answers, the report pair, and detection on generated data.

Detection is tested on seeds 0-5 with a generator size (1,500 users, 400 items, 30,000 events, 6 groups) that
differs from the calibration runs behind params.yaml's thresholds (seeds 100-119; 2,000 users, 500 items,
25,000 and 60,000 events, 8 groups; benchmarks/bench_drift.py), so these seeds are held out.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from recflow.config import GenerateSettings, Settings, load_settings
from recflow.constants import ACTION, ITEM_ID, TIMESTAMP, USER_ID
from recflow.events.synth import DriftSpec, generate_events
from recflow.ops.drift import (
    DriftResult,
    _popularity_buckets,
    aggregates,
    compare,
    drift_windows,
    event_frames,
    verdict,
)
from recflow.ops.drift_report import write_report

from ..conftest import REPO

DAYS, DRIFT_DAY = 35, 28  # lookback 14 + reference 7 + current 7 days; the current window is the last 7
HELD_OUT_SEEDS = range(6)
SHIPPED = load_settings(REPO / "params.yaml")
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def frame(table: pa.Table) -> pd.DataFrame:
    return pd.DataFrame(
        {
            USER_ID: table[USER_ID].to_pandas().astype("category"),
            ITEM_ID: table[ITEM_ID].to_pandas().astype("category"),
            ACTION: table[ACTION].to_pandas().astype("category"),
            "ts": pc.cast(table[TIMESTAMP], "int64").to_numpy(),
        }
    )


def flagged(events: pd.DataFrame, settings: Settings) -> tuple[bool, list[str]]:
    windows = drift_windows(datetime.fromtimestamp(events["ts"].max() / 1000, UTC), settings)
    datasets, _ = compare(event_frames(events, windows, settings), settings)
    reasons = verdict(datasets)
    return bool(reasons), reasons


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
    events = frame(
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


@pytest.mark.parametrize("seed", HELD_OUT_SEEDS)
@pytest.mark.parametrize("drift", [False, True], ids=["same-distribution", "injected-drift"])
def test_injected_drift_is_flagged_and_the_same_distribution_is_not(seed: int, drift: bool) -> None:
    conf = GenerateSettings(seed=seed, users=1500, items=400, events=30_000, days=DAYS, groups=6)
    table = generate_events(conf, drift=DriftSpec(start_fraction=DRIFT_DAY / DAYS) if drift else None)
    is_flagged, reasons = flagged(frame(table), SHIPPED)
    assert is_flagged == drift, reasons  # a failure here is a miss (drift) or a false alarm (same distribution)


def test_the_report_pair_is_written_and_old_pairs_are_pruned(tmp_path: Path) -> None:
    table = generate_events(GenerateSettings(seed=3, users=500, items=200, events=12_000, days=DAYS, groups=4))
    events = frame(table)
    settings = SHIPPED.replace("drift", min_events=100)
    windows = drift_windows(datetime.fromtimestamp(events["ts"].max() / 1000, UTC), settings)
    frames = event_frames(events, windows, settings)
    datasets, snapshots = compare(frames, settings)
    stems = []
    for minute in range(3):
        result = DriftResult(
            drifted=False,
            reasons=verdict(datasets),
            windows=windows,
            datasets=datasets,
            skipped={"candidates": "no trained model"},
            aggregates=aggregates(frames),
            checked_at=(T0 + timedelta(minutes=minute)).isoformat(timespec="milliseconds"),
            snapshots=snapshots,
        )
        write_report(result, tmp_path, keep=2)
        assert result.html_path is not None and result.json_path is not None
        stems.append(result.json_path.stem)
    assert stems[0] == "drift-20240101T000000000Z"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{s}.{x}" for s in stems[1:] for x in ("html", "json"))
    summary = json.loads(result.json_path.read_text())
    assert summary["html"] == str(result.html_path) and summary["skipped"] == {"candidates": "no trained model"}
    assert {d["name"] for d in summary["datasets"]} == {"events", "users"}
    page = result.html_path.read_text()
    assert "recflow drift check: no drift" in page and page.count("<iframe") == 2
