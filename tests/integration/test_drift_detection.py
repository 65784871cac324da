"""The drift check on generated data: detection, no false alarm in the demo's undrifted data, and the report pair
(Evidently renders the drifted columns). (Windows, aggregates and the permutation test on known answers are in
tests/unit/test_drift.py; real windows in tests/model/test_drift_real_data.py.)

Detection is tested at the demo's size (params.yaml `generate`) on seeds 0-5, held out from the seeds the floors
(params.yaml drift.*.min_effect) were read from (42, 100-119; benchmarks/bench_drift.py).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from evidently.core.report import Snapshot

from recflow.config import GenerateSettings, Settings, load_settings
from recflow.events.synth import DriftSpec, generate_events
from recflow.ops.drift import (
    DRIFT,
    DriftResult,
    aggregates,
    drift_windows,
    event_frames,
    evidently_detail,
    judge,
    window_sizes,
)
from recflow.ops.drift_report import write_report

from ..conftest import REPO
from ..factories import drift_frame

HELD_OUT_SEEDS = range(6)
SHIPPED = load_settings(REPO / "params.yaml")
T0 = datetime(2024, 1, 1, tzinfo=UTC)
DAYS, DRIFT_DAY = 35, 28  # lookback 14 + gap 7 + reference 7 + current 7 days; the current window is the last 7


def flagged(events: pd.DataFrame, settings: Settings) -> tuple[bool, list[str]]:
    windows = drift_windows(datetime.fromtimestamp(events["ts"].max() / 1000, UTC), settings)
    status, reasons, _ = judge(event_frames(events, windows, settings), settings)
    return status == DRIFT, reasons


@pytest.mark.parametrize("seed", HELD_OUT_SEEDS)
@pytest.mark.parametrize("drift", [False, True], ids=["same-distribution", "injected-drift"])
def test_injected_drift_is_flagged_and_the_demos_undrifted_data_is_not(seed: int, drift: bool) -> None:
    conf = dataclasses.replace(SHIPPED.generate, seed=seed)
    days = conf.days
    table = generate_events(conf, drift=DriftSpec(start_fraction=(days - 7) / days) if drift else None)
    is_flagged, reasons = flagged(drift_frame(table), SHIPPED)
    assert is_flagged == drift, reasons  # a failure here is a miss (drift) or a false alarm (same distribution)
    if drift:  # flagged for what the generator changed: popularity, new items, the action mix
        assert {"events"} <= {r.split(":")[0] for r in reasons}


def test_the_report_pair_is_written_and_old_pairs_are_pruned(tmp_path: Path) -> None:
    conf = GenerateSettings(seed=3, users=500, items=200, events=12_000, days=DAYS, groups=4)
    table = generate_events(conf, drift=DriftSpec(start_fraction=DRIFT_DAY / DAYS))
    events = drift_frame(table)
    settings = SHIPPED.replace("drift", permutations=500)
    windows = drift_windows(datetime.fromtimestamp(events["ts"].max() / 1000, UTC), settings)
    frames = event_frames(events, windows, settings)
    status, reasons, datasets = judge(frames, settings)
    assert status == DRIFT
    detail = evidently_detail(frames, datasets, settings)
    stems = []
    for minute in range(3):
        result = DriftResult(
            status=status,
            reasons=reasons,
            windows=windows,
            sizes=window_sizes(frames),
            datasets=datasets,
            skipped={"candidates": "no trained model"},
            aggregates=aggregates(frames),
            checked_at=(T0 + timedelta(minutes=minute)).isoformat(timespec="milliseconds"),
            evidently=detail,
        )
        write_report(result, tmp_path, keep=2)
        assert result.html_path is not None and result.json_path is not None
        stems.append(result.json_path.stem)
    assert stems[0] == "drift-20240101T000000000Z"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{s}.{x}" for s in stems[1:] for x in ("html", "json", "evidently.json")
    )
    summary = json.loads(result.json_path.read_text())
    assert summary["html"] == str(result.html_path) and summary["skipped"] == {"candidates": "no trained model"}
    assert summary["evidently"] == str(result.evidently_path)
    assert summary["status"] == "drift" and summary["sizes"]["current"]["users"] > 100
    assert {d["name"] for d in summary["datasets"]} == {"events", "users"}
    page = result.html_path.read_text()
    # the verdict first, then the windows as dates and sizes, then the drifted columns; Evidently only for those
    assert (
        page.index("Drift check: <span class='drift'>DRIFT") < page.index("<h2>Windows") < page.index("Drifted columns")
    )
    assert f"{windows.current_start:%Y-%m-%d %H:%M}" in page and "reference_start" not in page  # dates, not JSON
    assert result.evidently_path is not None and result.evidently_path.name in page
    assert "<script" not in page and result.html_path.stat().st_size < 50_000  # no Evidently script inline
    # Evidently's detail of exactly the drifted columns, as a snapshot Evidently reads back and renders
    snapshot = Snapshot.load(result.evidently_path)
    assert sorted(m["config"]["column"] for m in snapshot.dict()["metrics"]) == sorted(
        f"{name}.{c.column}" for name, c in result.flagged()
    )
    assert result.evidently_path.stat().st_size < 1_000_000


def test_a_check_without_drift_writes_a_small_page(tmp_path: Path) -> None:
    table = generate_events(dataclasses.replace(SHIPPED.generate, seed=4))  # the demo's undrifted data
    events = drift_frame(table)
    settings = SHIPPED.replace("drift", permutations=500)
    windows = drift_windows(datetime.fromtimestamp(events["ts"].max() / 1000, UTC), settings)
    frames = event_frames(events, windows, settings)
    status, reasons, datasets = judge(frames, settings)
    result = DriftResult(
        status, reasons, windows, window_sizes(frames), datasets, {}, aggregates(frames), T0.isoformat()
    )
    write_report(result, tmp_path, keep=2)
    assert result.html_path is not None and "Drift check: <span class=''>NO DRIFT" in result.html_path.read_text()
    assert result.html_path.stat().st_size < 20_000 and result.evidently_path is None
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".html", ".json"]
