"""The drift check with Evidently: detection on generated data, and the report pair. (Windows and aggregates with
known answers, which need no Evidently run, are in tests/unit/test_drift.py.)

Detection is tested on seeds 0-5 with a generator size (1,500 users, 400 items, 30,000 events, 6 groups) that
differs from the calibration runs behind params.yaml's thresholds (seeds 100-119; 2,000 users, 500 items,
25,000 and 60,000 events, 8 groups; benchmarks/bench_drift.py), so these seeds are held out.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from recflow.config import GenerateSettings, Settings, load_settings
from recflow.events.synth import DriftSpec, generate_events
from recflow.ops.drift import (
    DriftResult,
    aggregates,
    compare,
    drift_windows,
    event_frames,
    verdict,
)
from recflow.ops.drift_report import write_report

from ..conftest import REPO
from ..factories import drift_frame

DAYS, DRIFT_DAY = 35, 28  # lookback 14 + reference 7 + current 7 days; the current window is the last 7
HELD_OUT_SEEDS = range(6)
SHIPPED = load_settings(REPO / "params.yaml")
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def flagged(events: pd.DataFrame, settings: Settings) -> tuple[bool, list[str]]:
    windows = drift_windows(datetime.fromtimestamp(events["ts"].max() / 1000, UTC), settings)
    datasets, _ = compare(event_frames(events, windows, settings), settings)
    reasons = verdict(datasets)
    return bool(reasons), reasons


@pytest.mark.parametrize("seed", HELD_OUT_SEEDS)
@pytest.mark.parametrize("drift", [False, True], ids=["same-distribution", "injected-drift"])
def test_injected_drift_is_flagged_and_the_same_distribution_is_not(seed: int, drift: bool) -> None:
    conf = GenerateSettings(seed=seed, users=1500, items=400, events=30_000, days=DAYS, groups=6)
    table = generate_events(conf, drift=DriftSpec(start_fraction=DRIFT_DAY / DAYS) if drift else None)
    is_flagged, reasons = flagged(drift_frame(table), SHIPPED)
    assert is_flagged == drift, reasons  # a failure here is a miss (drift) or a false alarm (same distribution)


def test_the_report_pair_is_written_and_old_pairs_are_pruned(tmp_path: Path) -> None:
    table = generate_events(GenerateSettings(seed=3, users=500, items=200, events=12_000, days=DAYS, groups=4))
    events = drift_frame(table)
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
