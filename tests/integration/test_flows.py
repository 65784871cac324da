"""Real Prefect flow runs (prefect_test_harness: a temporary Prefect server and database) on generated data.

The tests share one project folder and run in file order: ingest fills the store, train trains on it, the crash
test retrains over that model, drift compares windows, and the pipeline ingests drifted events and retrains.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from ..conftest import write_small_project

# 36 days of one distribution (the drift check reads lookback 14 + gap 7 + reference 7 + current 7 = 35 days), then
# 7 drifted days (the generator's drift option); ~800 events a day
DAYS, DRIFT_DAY, EVENTS = 43, 36, 35_000


@pytest.fixture(scope="session", autouse=True)
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    updates = {
        PREFECT_HOME: str(home),
        PREFECT_LOCAL_STORAGE_PATH: str(home / "storage"),
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 60,
    }
    with temporary_settings(updates=updates), prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A DVC project (no git) with the small params, 36 days of events in the inbox and 7 drifted days kept
    aside in late.parquet; the working directory is the project, as for a deployment."""
    from recflow.config import load_settings
    from recflow.events.fileio import write_events
    from recflow.events.synth import DEFAULT_START, DriftSpec, generate_events

    root = tmp_path_factory.mktemp("project")
    write_small_project(
        root,
        als={"tune": {"enabled": False}},
        ranker={"n_estimators": 40},
        generate={"days": DAYS, "events": EVENTS},
    )
    settings = load_settings(root / "params.yaml")
    table = generate_events(settings.generate, drift=DriftSpec(start_fraction=DRIFT_DAY / DAYS))
    cut = pa.scalar(DEFAULT_START + timedelta(days=DRIFT_DAY), type=table["timestamp"].type)
    write_events(table.filter(pc.less(table["timestamp"], cut)), root / "data/inbox/early.parquet")
    write_events(table.filter(pc.greater_equal(table["timestamp"], cut)), root / "late.parquet")
    dvc = Path(sys.executable).parent / "dvc"
    subprocess.run(
        [str(dvc), "init", "--no-scm", "-q"], cwd=root, check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"}
    )
    before = Path.cwd()
    os.chdir(root)
    try:
        yield root
    finally:
        os.chdir(before)


def artifact_keys() -> set[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {a.key for a in client.read_artifacts() if a.key}


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def store_events(root: Path) -> int:
    from recflow.store.eventstore import store_summary

    return store_summary(root / "data/events").events


def test_ingest_stores_the_inbox_records_a_data_version_and_stores_nothing_twice(project: Path) -> None:
    from flows.ingest import ingest

    first = ingest(project=str(project))
    assert first["inbox"]["stored"] == first["inbox"]["read"] > 20_000
    assert first["inbox"]["rejected"] == 0
    assert first["event_log"] == {"read": 0, "stored": 0, "duplicate": 0, "rejected": 0, "dead_lettered": 0}
    assert store_events(project) == first["stored"]
    md5 = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    assert first["dvc_md5"] == md5

    again = ingest(project=str(project))
    assert again["stored"] == 0 and again["inbox"]["read"] == 0  # the inbox's manifest: its files are not read again
    assert store_events(project) == first["stored"]
    assert again["store_version"] == first["store_version"]
    assert "ingest-counts" in artifact_keys()


def test_train_writes_model_and_metrics_and_is_cached_when_nothing_changed(project: Path) -> None:
    from flows.train import train

    result = train(project=str(project))
    metrics = project / "models/metrics.json"
    assert metrics.exists() and result["metrics"]["served"]["ndcg@10"] > 0
    assert (project / "models/bundle/bundle.json").exists()
    written = metrics.stat().st_mtime_ns, (project / "models/bundle/als.npz").stat().st_mtime_ns

    again = train(project=str(project))
    assert again["metrics"] == result["metrics"]
    assert (metrics.stat().st_mtime_ns, (project / "models/bundle/als.npz").stat().st_mtime_ns) == written
    assert "train-metrics" in artifact_keys()


def test_a_crash_in_the_middle_of_train_leaves_the_previous_model_in_place(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import scipy.sparse as sp

    from flows.train import train
    from recflow.model import bundle as bundle_module

    bundle_dir = project / "models/bundle"
    before = folder_digest(bundle_dir)
    real_save, calls = sp.save_npz, []

    def save_npz(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 2:  # the production bundle's history, after its factors were written
            raise OSError(28, "No space left on device (injected)")
        real_save(*args, **kwargs)

    monkeypatch.setattr(bundle_module.sp, "save_npz", save_npz)
    state = train(project=str(project), force=True, return_state=True)
    assert state.is_failed() and "No space left on device" in str(state.message)
    assert len(calls) == 2
    assert folder_digest(bundle_dir) == before
    assert not [p for p in (project / "models").iterdir() if p.name.startswith(".bundle.")]
    monkeypatch.undo()
    assert bundle_module.ModelBundle.load(bundle_dir).user_factors.shape[0] > 0  # the previous bundle, whole


@pytest.fixture
def trained(project: Path) -> Path:
    """The project after the ingest and train flows: no-ops when the tests above ran them, so that the drift tests
    also run on their own (`pytest -k drift` used to find an empty store)."""
    from flows.ingest import ingest
    from flows.train import train

    ingest(project=str(project))
    train(project=str(project))
    return project


def test_drift_flow_writes_the_report_pair_and_finds_no_drift_in_one_distribution(trained: Path) -> None:
    from flows.drift import drift

    project = trained
    result = drift(project=str(project))
    assert result["drifted"] is False, result["reasons"]
    assert {d["name"] for d in result["datasets"]} == {"events", "users", "candidates"}
    html, summary = Path(result["html"]), Path(result["json"])
    assert html.parent == project / "reports/drift" and html.stat().st_size < 100_000  # no drift: no Evidently detail
    assert summary.exists() and summary.stem == html.stem
    assert "drift-summary" in artifact_keys()


def test_pipeline_ingests_drifted_events_retrains_and_says_why(trained: Path) -> None:
    from flows.pipeline import pipeline

    project = trained
    late = pq.read_metadata(project / "late.parquet").num_rows
    (project / "late.parquet").rename(project / "data/inbox/late.parquet")
    before = datetime.now(UTC)
    result = pipeline(project=str(project))
    assert result["ingest"]["stored"] == late > 3_000
    assert result["retrained"] and any(r.startswith("drift: events") for r in result["reasons"]), result["reasons"]
    assert result["train"]["metrics"]["served"]["ndcg@10"] > 0
    trained_at = datetime.fromisoformat(
        yaml.safe_load((project / "models/bundle/bundle.json").read_text())["info"]["trained_at"]
    )
    assert trained_at >= before.replace(microsecond=0)
    assert {
        "pipeline-decision",
        "drift-summary",
        "ingest-counts",
        "train-metrics",
        "deploy-decision",
    } <= artifact_keys()
