"""The request guard in front of the service: who may write (the bearer token, or protected mode without one) before
anything else, JSON only, bodies within the limit (streamed or declared), the body handed on intact, and a /readyz
that names what is not ready. The request timeout lets a finished request go."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import warnings
import weakref
from collections.abc import Iterator

import pytest
from bentoml._internal.server.http.traffic import TimeoutMiddleware as BENTOML_TIMEOUT
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from recflow.serving.bentoml_adapter import CancellingTimeoutMiddleware
from recflow.serving.httpguard import RequestGuard, WriteAccess, is_loopback

with warnings.catch_warnings():
    # starlette 1.x deprecates its httpx-based TestClient in favour of httpx2, which is not installed here
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from starlette.testclient import TestClient

READY = {"value": (True, {"model": "ok"})}
OPEN = WriteAccess(token=None, protected=False)
JSON = {"content-type": "application/json"}
NETWORK = ("192.0.2.7", 50000)  # an address of the documentation range: not this machine


async def echo(request: Request) -> JSONResponse:
    return JSONResponse({"length": len(await request.body())})


def client(access: WriteAccess = OPEN, address: tuple[str, int] = NETWORK) -> TestClient:
    routes = [Route(path, echo, methods=["POST"]) for path in ("/echo", "/write", "/other")]
    app = RequestGuard(
        Starlette(routes=routes),
        post_routes=["/echo", "/write"],
        write_routes=["/write"],
        access=lambda: access,
        limit=lambda: 100,
        readiness=lambda: READY["value"],
    )
    return TestClient(app, client=address)


def test_a_json_body_within_the_limit_reaches_the_route_intact() -> None:
    response = client().post("/echo", content=b'{"a": 1}', headers={"content-type": "application/json"})
    assert response.status_code == 200 and response.json() == {"length": 8}


def test_other_content_types_and_oversized_bodies_are_refused_with_the_reason() -> None:
    form = client().post("/echo", content=b"a=1", headers={"content-type": "multipart/form-data; boundary=x"})
    assert form.status_code == 415 and "application/json" in form.json()["error"]
    big = client().post("/echo", content=b"x" * 101, headers={"content-type": "application/json"})
    assert big.status_code == 413 and "100 bytes" in big.json()["error"]

    def chunks() -> Iterator[bytes]:  # no content-length: counted while streaming
        yield b"x" * 60
        yield b"x" * 60

    streamed = client().post("/echo", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
def test_protected_mode_lets_loopback_clients_write_without_a_token(host: str) -> None:
    assert is_loopback((host, 1))
    protected = WriteAccess(token=None, protected=True)
    assert client(protected, (host, 1)).post("/write", content=b"{}", headers=JSON).status_code == 200


@pytest.mark.parametrize("address", [NETWORK, ("10.1.2.3", 1), ("::ffff:10.1.2.3", 1), ("2001:db8::1", 1),
                                     ("testclient", 50000)])  # fmt: skip
def test_protected_mode_refuses_a_write_from_the_network_and_says_how_to_allow_it(address: tuple[str, int]) -> None:
    assert not is_loopback(address)
    response = client(WriteAccess(token=None, protected=True), address).post("/write", content=b"{}", headers=JSON)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    message = response.json()["error"]
    for words in ("protected mode", address[0], "service.token", "RECFLOW_SERVICE_TOKEN", "protected_mode: false"):
        assert words in message
    assert client(WriteAccess(token=None, protected=True), address).post("/echo", json={}).status_code == 200


def test_protected_mode_can_be_turned_off() -> None:
    assert client(OPEN, NETWORK).post("/write", content=b"{}", headers=JSON).status_code == 200


def test_a_token_is_needed_from_everywhere_once_it_is_set() -> None:
    access = WriteAccess(token="s3cret", protected=True)
    for address in (NETWORK, ("127.0.0.1", 1)):
        missing = client(access, address).post("/write", content=b"{}", headers=JSON)
        assert missing.status_code == 401 and "bearer token" in missing.json()["error"]
        wrong = client(access, address).post("/write", content=b"{}", headers={**JSON, "authorization": "Bearer x"})
        assert wrong.status_code == 403
        right = client(access, address).post(
            "/write", content=b"{}", headers={**JSON, "authorization": "Bearer s3cret"}
        )
        assert right.status_code == 200


def test_the_caller_is_checked_before_the_body() -> None:
    """Regression (issue 11): a bad body without the token got 400 (or 413/415), telling an anonymous caller about the
    body; now 401 comes first, and the body is not read."""
    for access in (WriteAccess(token="s3cret", protected=True), WriteAccess(token=None, protected=True)):
        oversized = client(access).post("/write", content=b"x" * 500, headers={"content-type": "text/plain"})
        assert oversized.status_code == 401


def test_routes_not_guarded_pass_through() -> None:
    assert client().post("/other", content=b"x" * 500, headers={"content-type": "text/plain"}).status_code == 200


def test_readyz_says_which_part_is_not_ready() -> None:
    assert client().get("/readyz").json() == {"ready": True, "checks": {"model": "ok"}}
    READY["value"] = (False, {"model": "ok", "event_log": "unavailable: spool is read-only"})
    try:
        response = client().get("/readyz")
    finally:
        READY["value"] = (True, {"model": "ok"})
    assert response.status_code == 503 and "spool is read-only" in response.json()["checks"]["event_log"]


REQUEST_STATE: contextvars.ContextVar[object] = contextvars.ContextVar("request_state")


class RequestObject:
    """Stands for what a request leaves in its context (BentoML's tracing span and the like)."""


def context_outlives_the_request(middleware: type) -> bool:
    """Whether an object in the request's context is still alive after the response was sent."""

    async def app(scope: object, receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"{}"})  # type: ignore[operator]

    async def sent(message: object) -> None:
        pass

    async def request() -> bool:
        state = RequestObject()
        alive = weakref.ref(state)
        REQUEST_STATE.set(state)
        del state
        await middleware(app, timeout=30)({"type": "http"}, None, sent)  # type: ignore[arg-type]
        REQUEST_STATE.set(None)
        gc.collect()
        return alive() is not None  # checked while the loop (and any timer on it) is still running

    return asyncio.run(request())


@pytest.mark.parametrize(("middleware", "outlives"), [(BENTOML_TIMEOUT, True), (CancellingTimeoutMiddleware, False)])
def test_a_finished_request_is_let_go_at_once_not_after_the_timeout(middleware: type, outlives: bool) -> None:
    """BentoML's own timeout keeps the request's context for `traffic.timeout` seconds (when that case starts to
    fail, BentoML fixed it and CancellingTimeoutMiddleware can go)."""
    assert context_outlives_the_request(middleware) is outlives


def test_a_request_over_the_timeout_gets_a_504() -> None:
    async def slow(scope: object, receive: object, send: object) -> None:
        await asyncio.sleep(5)

    messages: list[dict] = []

    async def sent(message: dict) -> None:
        messages.append(message)

    asyncio.run(CancellingTimeoutMiddleware(slow, timeout=0.05)({"type": "http"}, None, sent))  # type: ignore[arg-type]
    assert messages[0]["status"] == 504 and b"0.05 seconds" in messages[1]["body"]
