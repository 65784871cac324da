"""The train flow: features -> train -> evaluate, the same library calls `dvc repro` runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from flows.tasks import (
    TRAIN_CODE,
    TRAIN_SECTIONS,
    build_features,
    evaluate_models,
    outputs_exist,
    settings_of,
    train_models,
)
from recflow.threads import limit_blas_threads


@flow(name="train", log_prints=True)
def train(project: str = ".", params: str = "params.yaml", force: bool = False) -> dict[str, Any]:
    """Rebuild features, train ALS and the ranker, evaluate on the test window. Stages whose data version and
    parameters did not change since their last run (and whose outputs exist) are taken from Prefect's cache.
    A failure leaves the previous trained bundle in place (bundles are swapped in whole).

    Args:
        project: the recflow project folder.
        params: the parameter file, relative to the project folder.
        force: recompute every stage even when cached.
    """
    limit_blas_threads()  # BLAS on one thread for this run, set here and not per call (recflow.threads)
    from recflow.model.evaluate import METRICS_FILE
    from recflow.store.versions import params_digest, source_digest, store_version

    root, settings = settings_of(project, params)
    metrics_file = root / settings.paths.models / METRICS_FILE
    previous = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
    version = store_version(root / settings.paths.store)
    digest = f"{params_digest(settings, TRAIN_SECTIONS)}-{source_digest(TRAIN_CODE)}"
    stages = []
    for stage in (build_features, train_models, evaluate_models):
        refresh = force or not outputs_exist(project, params, stage.name)  # a missing output is recomputed
        stages.append(stage.with_options(refresh_cache=refresh)(project, params, version, digest))
    features, trained, metrics = stages
    create_table_artifact(
        key="train-metrics",
        table=metrics_table(metrics, previous, "previous run"),
        description=f"offline metrics on the test window; data version {version}, params {digest}",
    )
    return {
        "features": features,
        "train": trained,
        "metrics": metrics,
        "data_version": version,
        "params_digest": digest,
        "metrics_file": str(Path(metrics_file)),
    }


def metrics_table(
    candidate: dict[str, Any], production: dict[str, Any] | None, label: str = "production"
) -> list[dict[str, Any]]:
    """One row per (model, metric): the candidate's value beside production's (or the previous run's)."""
    rows = []
    for model, values in candidate.items():
        if not isinstance(values, dict):
            continue
        for metric, value in values.items():
            if not isinstance(value, int | float):  # the intervals are pairs: the table shows the metrics
                continue
            other = (production or {}).get(model, {}).get(metric)
            rows.append(
                {
                    "model": model,
                    "metric": metric,
                    "candidate": round(value, 4),
                    label: None if other is None else round(other, 4),
                }
            )
    return rows


if __name__ == "__main__":
    train()
