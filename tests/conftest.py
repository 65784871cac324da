"""Shared fixtures, and one marker per test folder. OPENBLAS_NUM_THREADS must be set before numpy is first imported
(see STACK_NOTES).

The folder says what a test is, and the marker follows from it (so `-m "not integration"` works anywhere):
    tests/unit/         fast and pure: no processes, no redis-server, no model training, no Evidently run
    tests/model/        trains small models (or runs Evidently) and checks their behaviour
    tests/integration/  real processes: redis-server, `recflow`/`dvc`/`bentoml` subprocesses, Prefect
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MOVIELENS = REPO.parent / "shared" / "data" / "ml-100k"


FOLDER_MARKERS = ("unit", "model", "integration")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        folder = item.path.relative_to(Path(__file__).parent).parts[0]
        if folder in FOLDER_MARKERS:
            item.add_marker(folder)


@pytest.fixture
def movielens_dir() -> Path:
    if not (MOVIELENS / "u.data").exists():
        pytest.skip(f"MovieLens 100K not found at {MOVIELENS} (it is never part of the repo)")
    return MOVIELENS


SMALL = {
    "generate": {"users": 600, "items": 250, "events": 40_000, "days": 40, "groups": 6},
    "als": {"iterations": 10, "tune": {"budget_seconds": 10, "max_trials": 4}},
    "ranker": {"n_estimators": 80, "max_train_users": 2000},
    "evaluate": {"max_users": 2000},
}


def _merge(base: dict, changes: dict) -> dict:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def write_small_project(root: Path, **overrides: dict) -> Path:
    """A project folder with the shipped params.yaml made small enough for tests; returns its params path."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = _merge(_merge(params, SMALL), overrides)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def small_project(tmp_path: Path) -> Path:
    write_small_project(tmp_path)
    return tmp_path
