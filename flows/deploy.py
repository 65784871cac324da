"""The deploy flow: register the trained bundle and promote it through the gate (recflow.ops.registry)."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.tasks import deploy_candidate
from flows.train import metrics_table
from recflow.threads import limit_blas_threads


@flow(name="deploy", log_prints=True)
def deploy(project: str = ".", params: str = "params.yaml") -> dict[str, Any]:
    """Save models/bundle as a candidate version and promote it when it passes the gate (candidate NDCG@k on
    the current test window >= production's - registry.tolerance); production stays otherwise.

    Args:
        project: the recflow project folder.
        params: the parameter file, relative to the project folder.
    """
    limit_blas_threads()  # BLAS on one thread for this run, set here and not per call (recflow.threads)
    decision = deploy_candidate(project, params)
    create_markdown_artifact(
        key="deploy-decision",
        markdown=f"# {'Promoted' if decision['promoted'] else 'Not promoted'}: {decision['candidate']}\n"
        f"{decision['reason']}\n\nProduction now: {decision['production']}",
    )
    create_table_artifact(
        key="deploy-metrics",
        table=metrics_table(
            {"served": decision["candidate_metrics"]}, {"served": decision["production_metrics"] or {}}
        ),
        description="offline metrics of the candidate and of production before the decision",
    )
    return decision


if __name__ == "__main__":
    deploy()
