"""The drift flow: compare the current window with the reference window and publish the verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.tasks import check_drift
from recflow.threads import limit_blas_threads


@flow(name="drift", log_prints=True)
def drift(project: str = ".", params: str = "params.yaml") -> dict[str, Any]:
    """Run recflow's drift check (params.yaml `drift`), write reports/drift/drift-<UTC time>.{html,json} and
    return the verdict: {"drifted": bool, "reasons": [...], ...}.

    Args:
        project: the recflow project folder.
        params: the parameter file, relative to the project folder.
    """
    limit_blas_threads()  # BLAS on one thread for this run, set here and not per call (recflow.threads)
    summary = check_drift(project, params)
    create_markdown_artifact(
        key="drift-summary",
        markdown=drift_markdown(summary),
        description="drift verdict and the columns that decided it",
    )
    return summary


def drift_markdown(summary: dict[str, Any]) -> str:
    html = Path(summary["html"]).resolve()
    windows, sizes = summary["windows"], summary["sizes"]
    lines = [
        f"# Drift check: **{summary['status'].upper()}**",
        *(
            f"- {label} window: {windows[start]} .. {windows[stop]}, "
            f"{sizes[label]['users']:,} users, {sizes[label]['events']:,} events"
            for label, start, stop in (
                ("reference", "reference_start", "current_start"),
                ("current", "current_start", "end"),
            )
        ),
        f"- report: [{html.name}]({html.as_uri()}) (summary: `{summary['json']}`)",
        "",
        *(f"- {reason}" for reason in summary["reasons"]),
        *(f"- not compared: {name}: {why}" for name, why in summary["skipped"].items()),
        "",
        "| data set | column | distance | score | needed | p (adjusted) | drifted |",
        "|---|---|---|---|---|---|---|",
    ]
    for dataset in summary["datasets"]:
        for c in dataset["columns"]:
            lines.append(
                f"| {dataset['name']} | {c['column']} | {c['method']} | {c['score']:.4f} | {c['critical']:.4f} | "
                f"{c['p_value']:.4f} | {'yes' if c['drifted'] else ''} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    drift()
