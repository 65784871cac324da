"""A small trained (and deployed) project for the serving tests: generated events, features, the bundle."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from recflow.config import Settings, load_settings
from recflow.events.synth import generate_events
from recflow.model.evaluate import evaluate
from recflow.model.features import build_features
from recflow.model.training import BUNDLE_DIR, train
from recflow.ops.registry import ModelVersion, deploy
from recflow.store.eventstore import ingest_table

from .conftest import REPO, write_small_project

# Small enough to train in seconds, structured enough (taste groups) for similar items to mean something.
SERVING_PROJECT = {
    "generate": {"users": 300, "items": 150, "events": 12_000, "days": 30, "groups": 5},
    "als": {"factors": 16, "iterations": 10, "tune": {"enabled": False}},
    "ranker": {"n_estimators": 40, "max_train_users": 300},
    # the serving tests exercise the two-stage path: pin it rather than let validation choose
    "selection": {"models": ["als_ranker"], "half_lives_days": [30], "ease_lambdas": [50]},
}


def train_small_project(root: Path, **overrides: dict) -> tuple[Settings, Path]:
    """Write params.yaml, generate, ingest, build features and train in `root`; returns the settings (paths
    relative to root made absolute) and the deployable bundle's folder."""
    params = write_small_project(root, **{**SERVING_PROJECT, **overrides})
    settings = load_settings(params)
    paths = settings.paths
    absolute = {name: root / getattr(paths, name) for name in ("store", "rejected", "features", "models")}
    settings = settings.replace("paths", **absolute)
    ingest_table(
        generate_events(settings.generate),
        source="generated",
        store=settings.paths.store,
        rejected=settings.paths.rejected,
        settings=settings.events,
    )
    build_features(settings.paths.store, settings.paths.features, settings)
    train(settings.paths.features, settings.paths.models, settings)
    return settings, settings.paths.models / BUNDLE_DIR


def deploy_small_project(root: Path, *, force: bool = False, **overrides: dict) -> ModelVersion:
    """Train, evaluate and deploy a small project in `root` (what `recflow deploy` leaves for the service)."""
    settings, _ = train_small_project(root, **overrides)
    evaluate(settings.paths.features, settings.paths.models, root / settings.paths.reports, settings)
    decision = deploy(settings, root=root, user="test", force=force)
    assert decision.promoted, decision.reason
    return decision.candidate


def service_module() -> Any:
    """bentos/service.py, imported once (BentoML resolves the API types through sys.modules)."""
    name = "recflow_bento_service"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bentos" / "service.py")
        assert spec is not None and spec.loader is not None
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


@contextmanager
def load_service(root: Path) -> Iterator[Any]:
    """The BentoML service class, serving the project in `root` while the context lasts (RECFLOW_PROJECT)."""
    before = os.environ.get("RECFLOW_PROJECT")
    os.environ["RECFLOW_PROJECT"] = str(root)
    try:
        yield service_module().Recommender
    finally:
        if before is None:
            del os.environ["RECFLOW_PROJECT"]
        else:
            os.environ["RECFLOW_PROJECT"] = before
