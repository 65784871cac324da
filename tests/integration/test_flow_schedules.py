"""The schedules have one source, prefect.yaml: `recflow schedule` (flows/serve.py) serves exactly its deployments
(a regression test for the two copies, prefect.yaml and constants in flows/serve.py, that could drift apart)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from flows.serve import PREFECT_YAML, deployments

from ..conftest import REPO


def test_the_served_deployments_are_those_of_prefect_yaml() -> None:
    assert PREFECT_YAML == REPO / "prefect.yaml"
    spec = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    served = {d.name: d for d in deployments(project="/srv/shop", params="prod.yaml")}
    assert sorted(served) == sorted(entry["name"] for entry in spec)
    for entry in spec:
        deployment = served[entry["name"]]
        assert deployment.entrypoint == entry["entrypoint"]
        assert deployment.parameters == {**entry["parameters"], "project": "/srv/shop", "params": "prod.yaml"}
        assert deployment.tags == entry["tags"] and deployment.description == entry["description"]
        assert len(deployment.schedules) == len(entry["schedules"])
        for schedule, wanted in zip(deployment.schedules, entry["schedules"], strict=True):
            if "interval" in wanted:
                assert schedule.schedule.interval == timedelta(seconds=wanted["interval"])
            else:
                assert (schedule.schedule.cron, schedule.schedule.timezone) == (wanted["cron"], wanted["timezone"])


def test_the_documented_schedules_are_the_served_ones() -> None:
    """README and flows/README.md promise: ingest every 5 minutes, drift hourly, the pipeline nightly (retrain)."""
    served = {d.name: d for d in deployments()}
    assert served["ingest-every-5-minutes"].schedules[0].schedule.interval == timedelta(minutes=5)
    assert served["drift-hourly"].schedules[0].schedule.cron == "0 * * * *"
    assert served["pipeline-nightly"].schedules[0].schedule.cron == "0 3 * * *"
    assert served["pipeline-nightly"].parameters["retrain"] is True


def test_a_schedule_without_interval_cron_or_rrule_is_a_clear_error(tmp_path: Path) -> None:
    spec = {"deployments": [{"name": "odd", "entrypoint": "flows/drift.py:drift", "schedules": [{"every": 5}]}]}
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="odd: a schedule needs interval, cron or rrule"):
        deployments(prefect_yaml=tmp_path / "prefect.yaml")
