"""Protected mode, as Redis has it (issue 11): a real `bentoml serve` bound to every interface (0.0.0.0, BentoML's
default) with no token refuses writes from the network with 401 and says how to set a token or opt out, while
loopback clients still write; with a token, every write needs it. Ids longer than events.max_id_length get 422 on
every endpoint. The network side is this machine's own non-loopback address (`hostname -I`): a connection to it
comes from it, not from loopback.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..conftest import REPO
from ..servingkit import deploy_small_project
from .test_bentoml_serve import serving, wait_until_ready

TOKEN = "protected-mode-token"
EVENT = {"user_id": "u000003", "item_id": "i000001", "action": "view", "timestamp": "2026-11-24T08:00:00Z"}
LONG = "x" * 10_000


def network_address() -> str:
    """An IPv4 address of this machine that is not loopback."""
    listed = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout.split()
    addresses = [a for a in listed if ipaddress.ip_address(a).version == 4 and not ipaddress.ip_address(a).is_loopback]
    if not addresses:
        pytest.skip(f"this machine has no non-loopback IPv4 address (hostname -I: {listed})")
    return addresses[0]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deployed small project with bentos/ in it and no token in params.yaml (the default: protected mode)."""
    root = tmp_path_factory.mktemp("protected")
    deploy_small_project(root, service={"reload_check_seconds": 0})
    (root / "bentos").mkdir()
    for name in ("service.py", "bentofile.yaml"):
        shutil.copy2(REPO / "bentos" / name, root / "bentos" / name)
    return root


@pytest.fixture(scope="module")
def open_service(project: Path) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """The service on 0.0.0.0 without a token: a client on loopback and one from the network address."""
    with serving(project, host="0.0.0.0") as local:
        assert wait_until_ready(local).status_code == 200
        with httpx.Client(base_url=f"http://{network_address()}:{local.base_url.port}", timeout=10) as remote:
            yield local, remote


def test_without_a_token_a_write_from_the_network_gets_401_saying_how_to_allow_it(
    open_service: tuple[httpx.Client, httpx.Client],
) -> None:
    remote = open_service[1]
    refused = remote.post("/events", json={"events": [EVENT]})
    assert refused.status_code == 401, refused.text
    message = refused.json()["error"]
    for words in ("protected mode", network_address(), "service.token", "RECFLOW_SERVICE_TOKEN", "protected_mode"):
        assert words in message
    assert remote.post("/reload", json={}).status_code == 401
    # before the body is looked at: a body the schema forbids gets 401 too, not 400
    assert remote.post("/events", json={"events": []}).status_code == 401
    # reads stay open
    assert remote.post("/recommend", json={"user_id": "u000003", "k": 3}).status_code == 200


def test_without_a_token_loopback_clients_still_write(open_service: tuple[httpx.Client, httpx.Client]) -> None:
    local = open_service[0]
    accepted = local.post("/events", json={"events": [EVENT]})
    assert accepted.status_code == 200 and accepted.json()["accepted"] == 1, accepted.text
    assert local.post("/reload", json={}).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "loc"),
    [
        ("/recommend", {"user_id": LONG}, ["user_id"]),
        ("/recommend", {"user_id": "u1", "recent_events": [{"item_id": LONG, "action": "view", "timestamp": 1}]},
         ["recent_events", 0, "item_id"]),
        ("/similar", {"item_id": LONG}, ["item_id"]),
        ("/events", {"events": [EVENT, {**EVENT, "user_id": LONG}]}, ["events", 1, "user_id"]),
        ("/events", {"events": [{**EVENT, "event_id": LONG}]}, ["events", 0, "event_id"]),
    ],
)  # fmt: skip
def test_an_id_over_the_limit_gets_422_on_every_endpoint(
    open_service: tuple[httpx.Client, httpx.Client], path: str, body: dict[str, object], loc: list[object]
) -> None:
    """Regression (issue 11): a 10,000-character user_id got 200 from /recommend."""
    response = open_service[0].post(path, json=body)
    assert response.status_code == 422, response.text
    (detail,) = response.json()["detail"]
    assert detail["loc"] == loc and detail["type"] == "id_too_long"
    assert "has 10000 characters, more than 256 (params.yaml: events.max_id_length)" in detail["msg"]


def test_with_a_token_every_write_needs_it(project: Path) -> None:
    with serving(project, host="0.0.0.0", extra_env={"RECFLOW_SERVICE_TOKEN": TOKEN}) as local:
        assert wait_until_ready(local).status_code == 200
        with httpx.Client(base_url=f"http://{network_address()}:{local.base_url.port}", timeout=10) as remote:
            for client in (remote, local):
                missing = client.post("/events", json={"events": [EVENT]})
                assert missing.status_code == 401 and "bearer token" in missing.json()["error"]
                wrong = client.post("/events", json={"events": [EVENT]}, headers={"Authorization": "Bearer nope"})
                assert wrong.status_code == 403
            given = remote.post("/events", json={"events": [EVENT]}, headers={"Authorization": f"Bearer {TOKEN}"})
            assert given.status_code == 200 and given.json()["accepted"] == 1, given.text
