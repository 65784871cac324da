"""A real `prefect server start` (not the ephemeral server, which never schedules) runs a scheduled deployment.

The server gets a temporary PREFECT_HOME, a free port and a 1-second scheduler loop (the default is 60 s); the
ingest flow is served with a 5-second interval schedule from a second process (`flow.serve`, as flows/serve.py
does), and the test waits until the scheduler's runs have completed and stored the inbox.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..conftest import REPO, write_small_project

BIN = Path(sys.executable).parent
STARTUP_SECONDS = 90
RUN_SECONDS = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(process: subprocess.Popen[bytes]) -> None:
    """End a process started here and its children (it leads its own session)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PREFECT_API_URL": api,
        "OPENBLAS_NUM_THREADS": "1",
    }
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).json() is True:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prefect server did not become healthy"
            time.sleep(1)
        yield api, env
    finally:
        stop(server)
        log.close()


def test_recflow_schedule_outside_the_project_folder_says_it_needs_it(tmp_path: Path) -> None:
    """The flows are not installed with the package: the help says so, and the error names the missing files."""
    recflow = str(BIN / "recflow")
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "COLUMNS": "200"}
    helped = subprocess.run([recflow, "schedule", "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert helped.returncode == 0 and "Run it in the recflow project folder" in helped.stdout
    done = subprocess.run([recflow, "schedule"], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "needs the recflow project folder" in done.stderr and "flows/serve.py or prefect.yaml" in done.stderr


def test_a_deployment_with_an_interval_schedule_runs_on_its_own(
    prefect_server: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    from recflow.config import GenerateSettings
    from recflow.events.fileio import write_events
    from recflow.events.synth import generate_events

    api, env = prefect_server
    project = tmp_path / "project"
    project.mkdir()
    write_small_project(project)
    write_events(
        generate_events(GenerateSettings(users=50, items=20, events=500, days=5)), project / "data/inbox/a.csv"
    )
    serve_code = (
        "from flows.ingest import ingest; "
        f"ingest.serve(name='every-5-seconds', interval=5, parameters={{'project': {str(project)!r}}})"
    )
    log = (tmp_path / "serve.log").open("wb")
    served = subprocess.Popen(
        [sys.executable, "-c", serve_code],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + RUN_SECONDS
        completed: list[dict] = []
        while not completed:
            assert served.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(2)
            done = {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}, "limit": 10}
            runs = httpx.post(f"{api}/flow_runs/filter", json=done, timeout=10).json()
            completed = [r for r in runs if r["auto_scheduled"]]  # created by the server's scheduler
        deployment = httpx.get(f"{api}/deployments/{completed[0]['deployment_id']}", timeout=10).json()
        assert deployment["name"] == "every-5-seconds"
        assert deployment["schedules"][0]["schedule"]["interval"] == 5.0
        assert any((project / "data/events").glob("date=*/part-*.parquet"))  # the scheduled ingest stored events
    finally:
        stop(served)
        log.close()
