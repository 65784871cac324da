"""`python -m flows.serve` (or `recflow schedule`): serve the scheduled deployments from this process.

The deployments (names, entrypoints, parameters, schedules, descriptions, tags) are read from the project's
prefect.yaml, the one place they are defined: a worker runs the same ones after `prefect deploy --all`.
Schedules fire only against a running Prefect server (`prefect server start`, PREFECT_API_URL set): the
ephemeral server never schedules.
"""

from __future__ import annotations

import argparse
import importlib
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from prefect import Flow, serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Interval, RRule, Schedule

PREFECT_YAML = Path(__file__).resolve().parent.parent / "prefect.yaml"


def deployments(
    project: str = ".", params: str = "params.yaml", prefect_yaml: Path = PREFECT_YAML
) -> list[RunnerDeployment]:
    """The deployments of prefect.yaml, each with its schedules and parameters (`project` and `params` replaced
    by the arguments: the served flows run in this process, not in prefect.yaml's folder)."""
    spec = yaml.safe_load(prefect_yaml.read_text()) or {}
    found: list[RunnerDeployment] = []
    for entry in spec.get("deployments") or []:
        deployment = _flow(entry["entrypoint"]).to_deployment(
            name=entry["name"],
            schedules=[_schedule(s, f"{prefect_yaml}: {entry['name']}") for s in entry.get("schedules") or []],
            parameters={**(entry.get("parameters") or {}), "project": project, "params": params},
            description=entry.get("description"),
            tags=entry.get("tags"),
        )
        # called outside an event loop, Prefect's sync-compatible method returns the deployment, not a coroutine
        assert isinstance(deployment, RunnerDeployment)
        found.append(deployment)
    if not found:
        raise ValueError(f"{prefect_yaml} defines no deployments: nothing to serve")
    return found


def _flow(entrypoint: str) -> Flow[..., Any]:
    """`flows/ingest.py:ingest` -> the flow object `ingest` of the module `flows.ingest`."""
    path, _, name = entrypoint.partition(":")
    flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
    if not isinstance(flow, Flow):
        raise TypeError(f"entrypoint {entrypoint} is not a Prefect flow")
    return flow


def _schedule(entry: dict[str, Any], where: str) -> Schedule:
    """One item of a deployment's `schedules:` in prefect.yaml (interval, cron or rrule)."""
    options = {k: v for k, v in entry.items() if k in ("timezone", "active")}
    if "interval" in entry:
        anchor = entry.get("anchor_date")
        anchor = datetime.fromisoformat(anchor) if isinstance(anchor, str) else anchor
        return Interval(entry["interval"], anchor_date=anchor, **options)
    if "cron" in entry:
        return Cron(entry["cron"], day_or=entry.get("day_or", True), **options)
    if "rrule" in entry:
        return RRule(entry["rrule"], **options)
    raise ValueError(f"{where}: a schedule needs interval, cron or rrule, not {sorted(entry)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__)
    parser.add_argument("--project", default=".", help="the recflow project folder")
    parser.add_argument("--params", default="params.yaml", help="parameter file, relative to the project folder")
    args = parser.parse_args(argv)
    serve(*deployments(args.project, args.params))


if __name__ == "__main__":
    main()
