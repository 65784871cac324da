"""The pipeline flow: ingest -> drift -> retrain when drift is flagged or the schedule asks -> deploy."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.deploy import deploy
from flows.drift import drift
from flows.ingest import ingest
from flows.tasks import settings_of
from flows.train import train
from recflow.threads import limit_blas_threads


@flow(name="pipeline", log_prints=True)
def pipeline(project: str = ".", params: str = "params.yaml", retrain: bool = False) -> dict[str, Any]:
    """One run a user can watch: ingest, check drift, retrain when drift is flagged (or `retrain`, as the
    nightly schedule passes, or when no model exists yet), then deploy through the gate. Why it retrained
    (or did not) is published as the `pipeline-decision` artifact before training starts. A failing stage
    fails the run with its reason and leaves the production model untouched.

    Args:
        project: the recflow project folder.
        params: the parameter file, relative to the project folder.
        retrain: retrain even without drift (the nightly deployment sets it).
    """
    limit_blas_threads()  # BLAS on one thread for this run, set here and not per call (recflow.threads)
    from recflow.model.bundle import BUNDLE_FILE
    from recflow.model.training import BUNDLE_DIR

    counts = ingest(project, params)
    checked = drift(project, params, return_state=True)
    reasons = []
    if retrain:
        reasons.append("scheduled retrain (retrain=true)")
    if checked.is_completed():
        verdict = checked.result()
        if verdict["drifted"]:
            reasons.append("drift: " + "; ".join(verdict["reasons"]))
        drift_note = f"drift: {'flagged' if verdict['drifted'] else 'none'} (report {verdict['html']})"
    else:
        drift_note = f"drift check did not run: {checked.message}"
    root, settings = settings_of(project, params)
    if not (root / settings.paths.models / BUNDLE_DIR / BUNDLE_FILE).exists():
        reasons.append("no trained model yet")
    decision = "retrain" if reasons else "no retrain: no drift flagged and not scheduled"
    create_markdown_artifact(
        key="pipeline-decision",
        markdown=f"# {decision}\n" + "".join(f"- {r}\n" for r in reasons) + f"\n{drift_note}\n\n"
        f"ingest: {counts['stored']} new events stored",
    )
    print(f"{decision}: {'; '.join(reasons)}")
    result: dict[str, Any] = {"retrained": bool(reasons), "reasons": reasons, "drift": drift_note, "ingest": counts}
    if reasons:
        result["train"] = train(project, params)
        result["deploy"] = deploy(project, params)
    return result


if __name__ == "__main__":
    pipeline()
