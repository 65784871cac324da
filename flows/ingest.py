"""The ingest flow: inbox files and the event log into the event store, then a new data version."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from flows.tasks import drain_event_log, ingest_inbox, record_data_version


@flow(name="ingest", log_prints=True)
def ingest(project: str = ".", params: str = "params.yaml") -> dict[str, Any]:
    """Drain every source into the event store and record the data version. Idempotent: a rerun stores
    nothing twice (the store skips every event_id it holds) and reads only the inbox files that arrived since
    (the inbox's manifest). It may run beside `recflow consume --follow`: every writer takes the store's lock.

    Args:
        project: the recflow project folder (holds params.yaml, data/, models/).
        params: the parameter file, relative to the project folder.
    """
    inbox = ingest_inbox(project, params)
    log = drain_event_log(project, params)
    version = record_data_version(project, params)
    create_table_artifact(
        key="ingest-counts",
        table=[{"source": "inbox", **inbox}, {"source": "event log", **log}],
        description=f"read = stored + duplicate + rejected; store version {version['store_version']}, "
        f"data.dvc md5 {version['dvc_md5'] or 'not recorded (no DVC project)'}",
    )
    return {"inbox": inbox, "event_log": log, "stored": inbox["stored"] + log["stored"], **version}


if __name__ == "__main__":
    ingest()
