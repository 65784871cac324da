"""A real `bentoml serve` process, started the way a user starts it: in the project's bentos/ folder, with no
recflow environment variables, talking HTTP to it on a free port.

The project is a copy of bentos/ inside a small trained project (tests/servingkit.py). BENTOML_HOME points at a
temporary folder so the test leaves nothing in the user's home.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from recflow.config import load_settings
from recflow.model.bundle import ModelBundle
from recflow.model.evaluate import evaluate
from recflow.model.training import BUNDLE_DIR
from recflow.ops.registry import deploy

from ..conftest import REPO
from ..servingkit import train_small_project

BENTOML = str(Path(sys.executable).parent / "bentoml")
RECFLOW = str(Path(sys.executable).parent / "recflow")
WATCH = {"service": {"reload_check_seconds": 1}}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained and evaluated project with bentos/ in it, nothing deployed yet."""
    root = tmp_path_factory.mktemp("served")
    settings, _ = train_small_project(root, **WATCH)
    evaluate(settings.paths.features, settings.paths.models, root / settings.paths.reports, settings)
    (root / "bentos").mkdir()
    for name in ("service.py", "bentofile.yaml"):
        shutil.copy2(REPO / "bentos" / name, root / "bentos" / name)
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serving(
    root: Path, *, cli: bool = False, extra_env: dict[str, str] | None = None, host: str = "127.0.0.1"
) -> Iterator[httpx.Client]:
    """`bentoml serve` in root/bentos (or `recflow serve` in root) on `host` until the block ends; yields a client
    (on loopback) once /livez answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECFLOW_")}
    env.update(BENTOML_HOME=str(root / ".bentoml-home"), BENTOML_DO_NOT_TRACK="True", **(extra_env or {}))
    log = (root / f"serve-{port}.log").open("w")
    command = [RECFLOW if cli else BENTOML, "serve", "--host", host, "--port", str(port)]
    process = subprocess.Popen(
        command,
        cwd=root if cli else root / "bentos",
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopping it stops its workers too
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None, (root / f"serve-{port}.log").read_text()
                try:
                    if client.get("/livez").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "bentoml serve did not start within 60 s"
                time.sleep(0.2)
            yield client
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def wait_until_ready(client: httpx.Client, seconds: float = 20) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while (ready := client.get("/readyz")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    return ready


def test_serves_the_production_version_once_one_is_deployed(project: Path) -> None:
    settings = load_settings(project / "params.yaml")
    with serving(project) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "no model version is deployed" in ready.json()["checks"]["model"]
        missing = client.post("/recommend", json={"user_id": "u1"})
        assert missing.status_code == 503 and "recflow deploy" in missing.json()["error"]
        version = deploy(settings, root=project, user="test").candidate  # the service notices the new pointer
        assert wait_until_ready(client).status_code == 200
        answer = client.post("/recommend", json={"user_id": "u000001", "k": 5}).json()
        assert answer["model_version"] == version.tag and len(answer["items"]) == 5
        assert client.get("/model").json()["tag"] == version.tag


def test_events_change_the_answer_at_once_and_survive_a_restart(project: Path) -> None:
    settings = load_settings(project / "params.yaml")
    deploy(settings, root=project, user="test")  # production already (first test) or now
    user = "u000002"
    with serving(project) as client:
        assert wait_until_ready(client).status_code == 200
        before = client.post("/recommend", json={"user_id": user, "k": 10}).json()["items"]
        bought = before[0]["item_id"]
        event = {"user_id": user, "item_id": bought, "action": "purchase", "timestamp": "2026-11-24T08:00:00Z"}
        accepted = client.post("/events", json={"events": [event]})
        assert accepted.status_code == 200 and accepted.json()["accepted"] == 1
        after = client.post("/recommend", json={"user_id": user, "k": 10}).json()["items"]
        assert after != before and bought not in [item["item_id"] for item in after]
        metrics = client.get("/metrics").text
        assert 'bentoml_service_request_duration_seconds_count{endpoint="/recommend"' in metrics
        time.sleep(1.1)  # service.item_stats_seconds: this request starts the item statistics' refresh on a thread
        client.post("/recommend", json={"user_id": user, "k": 10})
        time.sleep(0.5)  # and this answer counts the purchase there too
        settled = client.post("/recommend", json={"user_id": user, "k": 10}).json()["items"]
    with serving(project, cli=True) as client:  # a restart (through `recflow serve`) replays the user state
        assert wait_until_ready(client).status_code == 200
        deadline = time.monotonic() + 30  # the load's scan of the state notes the purchase in a thread
        while (answer := client.post("/recommend", json={"user_id": user, "k": 10}).json()["items"]) != settled:
            assert time.monotonic() < deadline, (answer, settled)
            time.sleep(0.2)


def test_two_replicas_share_the_user_state_through_redis(project: Path) -> None:
    deploy(load_settings(project / "params.yaml"), root=project, user="test")
    user = f"replica-test-{uuid.uuid4().hex}"  # a new user: its one Redis key is removed afterwards
    redis_env = {"RECFLOW_SERVICE_REDIS_URL": "redis://127.0.0.1:6379/0"}
    try:
        with serving(project, extra_env=redis_env) as one, serving(project, extra_env=redis_env) as other:
            assert wait_until_ready(one).status_code == 200 and wait_until_ready(other).status_code == 200
            assert other.post("/recommend", json={"user_id": user}).json()["strategy"] == "popular"
            liked = one.post("/recommend", json={"user_id": user}).json()["items"][0]["item_id"]
            event = {"user_id": user, "item_id": liked, "action": "purchase", "timestamp": 1795000000}
            assert one.post("/events", json={"events": [event]}).json()["users_updated"] == 1
            answer = other.post("/recommend", json={"user_id": user}).json()
            assert answer["strategy"] == "personalized" and liked not in [i["item_id"] for i in answer["items"]]
    finally:
        client = redis.Redis()
        prefix = load_settings(project / "params.yaml").service.redis_prefix
        client.delete(f"{prefix}{user}", b"\x00changes:" + prefix.encode())  # the user and the change feed
        client.close()


def worker_processes(port: int) -> int:
    """How many BentoML service workers the `bentoml serve` on this port started."""
    server = subprocess.run(["pgrep", "-f", f"serve --host 127.0.0.1 --port {port}$"], capture_output=True, text=True)
    (pid,) = server.stdout.split()
    workers = subprocess.run(["pgrep", "-P", pid, "-f", "_bentoml_impl.worker.service"], capture_output=True)
    return len(workers.stdout.split())


def test_two_workers_answer_from_the_same_user_state_in_redis(project: Path, tmp_path: Path) -> None:
    """service.workers: 2 with the user state in Redis. Each request comes on a new connection, so the kernel hands
    them to either worker; every answer must reflect the event that one of them received."""
    root = tmp_path / "project"
    shutil.copytree(project, root, ignore=shutil.ignore_patterns("serve-*.log"))
    deploy(load_settings(root / "params.yaml"), root=root, user="test")
    prefix = f"test-workers-{uuid.uuid4().hex}:"
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["service"].update(workers=2, redis_url="redis://127.0.0.1:6379/0", redis_prefix=prefix)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    user = "a-new-user"
    try:
        with serving(root) as client:
            assert wait_until_ready(client).status_code == 200
            assert worker_processes(client.base_url.port) == 2
            liked = client.post("/recommend", json={"user_id": user}).json()["items"][0]["item_id"]
            event = {"user_id": user, "item_id": liked, "action": "purchase", "timestamp": 1795000000}
            assert client.post("/events", json={"events": [event]}).json()["users_updated"] == 1
            for _ in range(12):
                answer = httpx.post(f"{client.base_url}/recommend", json={"user_id": user}).json()
                assert answer["strategy"] == "personalized" and liked not in [i["item_id"] for i in answer["items"]]
            # what one worker receives moves both workers' popularity within service.item_stats_seconds
            bundle = ModelBundle.load(root / "models" / BUNDLE_DIR)
            rising = str(bundle.item_ids[bundle.popular_order[len(bundle.popular_order) // 2]])
            buyers = int(bundle.popularity.max() / bundle.action_weights[bundle.actions.index("purchase")]) + 2
            bought = [{"user_id": f"buyer{n}", "item_id": rising, "action": "purchase", "timestamp": 1795000000}
                      for n in range(buyers)]  # fmt: skip
            assert client.post("/events", json={"events": bought}).json()["accepted"] == buyers
            deadline, in_a_row = time.monotonic() + 30, 0
            while in_a_row < 12:  # each worker refreshes on a thread that a request starts once a second
                answer = httpx.post(f"{client.base_url}/recommend", json={"user_id": f"newcomer{in_a_row}"}).json()
                assert answer["strategy"] == "popular" and time.monotonic() < deadline
                in_a_row = in_a_row + 1 if answer["items"][0]["item_id"] == rising else 0
                time.sleep(0.05)
    finally:
        redis_client = redis.Redis()
        redis_client.delete(*redis_client.keys(f"{prefix}*"), b"\x00changes:" + prefix.encode())
        redis_client.close()


def test_more_than_one_worker_without_redis_is_refused_with_what_to_set(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("service: {workers: 2}\n")
    (tmp_path / "bentos").mkdir()
    shutil.copy2(REPO / "bentos" / "service.py", tmp_path / "bentos" / "service.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECFLOW_")}
    env.update(BENTOML_HOME=str(tmp_path / ".bentoml-home"), BENTOML_DO_NOT_TRACK="True")
    result = subprocess.run(
        [BENTOML, "serve", "--port", str(free_port())],
        cwd=tmp_path / "bentos", env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "service.workers is 2, which needs the user state in Redis" in result.stdout + result.stderr


def test_recflow_serve_says_where_the_service_is_missing(tmp_path: Path) -> None:
    result = subprocess.run([RECFLOW, "serve", "--bentos", "nowhere"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and "no service.py in nowhere" in result.stderr
