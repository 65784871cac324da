"""The ranker part of the drift check on a trained model: its candidates' features and scores move when the
events drift and stay put when they do not. Seed 7 is not held out: drift.candidates.min_effect was read from it
(other seeds: benchmarks/bench_drift.py --with-model)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from recflow.config import GenerateSettings, load_settings
from recflow.events.synth import DEFAULT_START, DriftSpec, generate_events
from recflow.model import training
from recflow.model.features import build_features
from recflow.ops.drift import CANDIDATES, check_drift
from recflow.store.eventstore import ingest_table

from ..conftest import REPO

DAYS, DRIFT_DAY = 36, 29  # the check reads lookback 14 + gap 7 + reference 7 + current 7 days; a day to spare


@pytest.mark.parametrize("drift", [False, True], ids=["same-distribution", "injected-drift"])
def test_ranker_inputs_drift_with_the_events(tmp_path: Path, drift: bool) -> None:
    settings = load_settings(REPO / "params.yaml")
    settings = settings.replace("als", iterations=8, tune=settings.als.tune.__class__(enabled=False))
    settings = settings.replace("ranker", n_estimators=40)
    settings = settings.replace("selection", models=("als_ranker",), half_lives_days=(30.0,))  # the ranker's inputs
    conf = GenerateSettings(seed=7, users=1000, items=300, events=30_000, days=DAYS, groups=6)
    table = generate_events(conf, drift=DriftSpec(start_fraction=DRIFT_DAY / DAYS) if drift else None)
    cut = pa.scalar(DEFAULT_START + timedelta(days=DRIFT_DAY), type=table["timestamp"].type)
    paths = settings.paths
    store = {"store": tmp_path / paths.store, "rejected": tmp_path / paths.rejected, "settings": settings.events}
    now = datetime(2100, 1, 1, tzinfo=UTC)
    ingest_table(table.filter(pc.less(table["timestamp"], cut)), source="before", now=now, **store)
    build_features(tmp_path / paths.store, tmp_path / paths.features, settings)
    training.train(tmp_path / paths.features, tmp_path / paths.models, settings)  # the model in production
    ingest_table(table.filter(pc.greater_equal(table["timestamp"], cut)), source="current", now=now, **store)

    result = check_drift(settings, root=tmp_path)
    (candidates,) = [d for d in result.datasets if d.name == CANDIDATES]
    assert candidates.current_rows > 10_000 and not result.skipped
    assert candidates.drifted is drift, [(c.column, round(c.score, 3)) for c in candidates.columns if c.drifted]
    assert any(c.column == "ranker_score" for c in candidates.columns)
