"""Prefect tasks: each wraps one recflow library call, the same call the CLI and dvc.yaml make.

Only the steps that do I/O against something outside this process (files arriving, the event log, DVC, the
model registry) retry, with backoff, and only on I/O errors; compute stages fail at once with their reason.
The features, train and evaluate tasks are cached on the store's data version and the parameters they read,
so a rerun with unchanged inputs (and outputs still in place) skips them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.context import TaskRunContext

from recflow.config import Settings, load_settings
from recflow.errors import EventLogUnavailableError, StoreWriteError

IO_ERRORS = (OSError, TimeoutError, EventLogUnavailableError, StoreWriteError)
RETRY_DELAYS: list[float] = [2, 8, 30]  # seconds: exponential backoff
TRAIN_SECTIONS = ("events", "features", "als", "candidates", "ranker", "evaluate")  # what dvc.yaml's stages read
TRAIN_CODE = tuple(
    f"recflow.model.{m}"
    for m in ("features", "training", "candidates", "ranker_features", "ranker", "bundle", "evaluate", "metrics")
)  # and the code they run


def settings_of(project: str, params: str) -> tuple[Path, Settings]:
    root = Path(project)
    return root, load_settings(root / params)


def _retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only when the failure is an I/O error (a bad file or bad parameters do not heal by waiting)."""
    try:
        state.result()
    except IO_ERRORS:
        return True
    except Exception:  # any other failure is final
        return False
    return False


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    return get_run_logger()


@task(retries=3, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=_retry_on_io)
def ingest_inbox(project: str, params: str) -> dict[str, Any]:
    """The inbox files that arrived since the last run into the store (store.inbox.ingest_inbox: validation,
    dedup, rejected log, then each file recorded in the inbox's manifest, so it is not read again)."""
    from recflow.store.inbox import ingest_inbox as ingest_new

    root, settings = settings_of(project, params)
    inbox = root / settings.paths.inbox
    paths = settings.paths
    report = ingest_new(inbox, store=root / paths.store, rejected=root / paths.rejected, settings=settings.events)
    counts = {k: getattr(report, k) for k in ("read", "stored", "duplicate", "rejected")}
    _logger().info("inbox %s: %s", inbox, counts)
    return counts


@task(retries=3, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=_retry_on_io)
def drain_event_log(project: str, params: str) -> dict[str, Any]:
    """Everything pending in the event log (Redis stream or local spool) into the store, via
    recflow.stream.consumer.drain."""
    from recflow.stream.consumer import drain

    root, settings = settings_of(project, params)
    report = drain(settings, root=root)
    counts = {k: getattr(report, k) for k in ("read", "stored", "duplicate", "rejected", "dead_lettered")}
    _logger().info("event log %s: %s", report.where, counts)
    return counts


@task(retries=3, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=_retry_on_io)
def record_data_version(project: str, params: str) -> dict[str, str | None]:
    """The store's data version, and `dvc add` of the data folder when the project is a DVC project."""
    from recflow.store.versions import dvc_add, dvc_enabled, store_version

    root, settings = settings_of(project, params)
    data_dir = Path(settings.paths.store.parts[0])  # the folder data.dvc tracks as a whole (ARCHITECTURE.md)
    dvc_md5 = dvc_add(root, data_dir) if dvc_enabled(root) else None
    if dvc_md5 is None:
        _logger().info("no .dvc folder in %s: data version not recorded with DVC", root.resolve())
    return {"store_version": store_version(root / settings.paths.store), "dvc_md5": dvc_md5}


def _cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Stage name, data version and parameters digest. The flow refreshes the cache when the stage's outputs
    are missing (see `outputs_exist`), so a deleted model is retrained, not taken from the cache."""
    return f"recflow-{context.task.name}-{parameters['data_version']}-{parameters['params_digest']}"


def outputs_exist(project: str, params: str, stage: str) -> bool:
    """Whether the file that marks a stage's outputs as complete (written last) is in place."""
    from recflow.model.bundle import BUNDLE_FILE
    from recflow.model.evaluate import METRICS_FILE
    from recflow.model.features import META_FILE
    from recflow.model.training import BUNDLE_DIR

    root, settings = settings_of(project, params)
    paths = settings.paths
    marker = {
        "build_features": paths.features / META_FILE,
        "train_models": paths.models / BUNDLE_DIR / BUNDLE_FILE,
        "evaluate_models": paths.models / METRICS_FILE,
    }[stage]
    return (root / marker).exists()


@task(cache_key_fn=_cache_key, persist_result=True)
def build_features(project: str, params: str, data_version: str, params_digest: str) -> dict[str, Any]:
    from recflow.model.features import build_features as build

    root, settings = settings_of(project, params)
    return asdict(build(root / settings.paths.store, root / settings.paths.features, settings))


@task(cache_key_fn=_cache_key, persist_result=True)
def train_models(project: str, params: str, data_version: str, params_digest: str) -> dict[str, Any]:
    from recflow.model.training import train

    root, settings = settings_of(project, params)
    report = train(root / settings.paths.features, root / settings.paths.models, settings, progress=_logger().info)
    return {
        "als_params": report.als_params,
        "ranker": report.ranker and {k: v for k, v in report.ranker.items() if k != "feature_importance"},
        "seconds": report.seconds,
    }


@task(cache_key_fn=_cache_key, persist_result=True)
def evaluate_models(project: str, params: str, data_version: str, params_digest: str) -> dict[str, Any]:
    from recflow.model.evaluate import METRICS_FILE, evaluate

    root, settings = settings_of(project, params)
    paths = settings.paths
    evaluate(root / paths.features, root / paths.models, root / paths.reports, settings)
    metrics: dict[str, Any] = json.loads((root / paths.models / METRICS_FILE).read_text())
    return metrics


@task
def check_drift(project: str, params: str) -> dict[str, Any]:
    """recflow.ops.drift.run_drift: compare the windows, write reports/drift/drift-<time>.{html,json}."""
    from recflow.ops.drift_report import run_drift

    root, settings = settings_of(project, params)
    result = run_drift(settings, root=root)
    _logger().info("drift: %s %s", result.drifted, "; ".join(result.reasons))
    return result.summary() | {"json": str(result.json_path)}


@task(retries=2, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=_retry_on_io)
def deploy_candidate(project: str, params: str) -> dict[str, Any]:
    """recflow.ops.registry.deploy: register the trained bundle and promote it through the gate."""
    from recflow.ops.registry import deploy

    root, settings = settings_of(project, params)
    decision = deploy(settings, root=root)
    return {
        "promoted": decision.promoted,
        "reason": decision.reason,
        "candidate": decision.candidate.version,
        "production": None if decision.production is None else decision.production.version,
        "metric": decision.metric,
        "candidate_score": decision.candidate_score,
        "production_score": decision.production_score,
        "standard_error": decision.standard_error,
        "candidate_metrics": decision.candidate.metrics,
        "production_metrics": None if decision.previous is None else decision.previous.metrics,
    }
