"""`python -m flows.serve` (or `recflow schedule`): serve the scheduled deployments from this process.

Schedules fire only against a running Prefect server (`prefect server start`, PREFECT_API_URL set): the
ephemeral server never schedules. The same deployments, run by a worker instead, are in prefect.yaml.
"""

from __future__ import annotations

import argparse

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from flows.drift import drift
from flows.ingest import ingest
from flows.pipeline import pipeline

INGEST_EVERY_SECONDS = 300
DRIFT_CRON = "0 * * * *"  # hourly
PIPELINE_CRON = "0 3 * * *"  # nightly, 03:00 UTC


def deployments(project: str = ".", params: str = "params.yaml") -> list[RunnerDeployment]:
    """The three scheduled deployments (names as in prefect.yaml)."""
    base = {"project": project, "params": params}
    return [
        ingest.to_deployment(name="ingest-every-5-minutes", interval=INGEST_EVERY_SECONDS, parameters=base),
        drift.to_deployment(name="drift-hourly", cron=DRIFT_CRON, parameters=base),
        pipeline.to_deployment(name="pipeline-nightly", cron=PIPELINE_CRON, parameters={**base, "retrain": True}),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__)
    parser.add_argument("--project", default=".", help="the recflow project folder")
    parser.add_argument("--params", default="params.yaml", help="parameter file, relative to the project folder")
    args = parser.parse_args(argv)
    serve(*deployments(args.project, args.params))


if __name__ == "__main__":
    main()
