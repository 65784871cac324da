"""ASGI middleware in front of the HTTP service (bentos/service.py): who may write, JSON-only request bodies within
a size limit on the API routes, and a /readyz whose JSON body says which part is not ready. Plain ASGI (starlette):
the request timeout that replaces BentoML's own is in `recflow.serving.bentoml_adapter`.

On the write routes the caller is checked first, before the body is read, so 401 / 403 come before 415 / 413 and
the service's 400 / 422: the bearer token when one is set (`service.token`), else protected mode (as Redis has it):
only loopback clients (127.0.0.0/8, ::1) may write, anyone else gets 401 saying how to set a token or opt out
(`service.protected_mode: false`). The client address is the one the server gives the app: uvicorn (BentoML's
server) takes it from X-Forwarded-For only when the connection comes from loopback, so a reverse proxy on the same
machine must send that header, or every client it forwards looks local.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

Readiness = Callable[[], tuple[bool, dict[str, str]]]


@dataclass(frozen=True)
class WriteAccess:
    """Who may call the write routes: `token` is the bearer token they need (None: none is set), and without one
    `protected` lets only loopback clients write (params.yaml: service.token, service.protected_mode)."""

    token: str | None
    protected: bool


def is_loopback(client: tuple[str, int] | None) -> bool:
    """Whether an ASGI client address is this machine's loopback (127.0.0.0/8, ::1, or ::ffff:127.x.y.z)."""
    if client is None:
        return False
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:  # a host name, or no address at all (a UNIX socket): not known to be local
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def write_denied(
    access: WriteAccess, path: str, client: tuple[str, int] | None, authorization: str
) -> tuple[int, str] | None:
    """The status and reason refusing a write to `path` by `client` with this Authorization header, or None."""
    if access.token:
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return 401, "missing bearer token: send `Authorization: Bearer <token>` (service.token)"
        if not hmac.compare_digest(given.strip().encode(), access.token.encode()):
            return 403, "wrong bearer token"
        return None
    if access.protected and not is_loopback(client):
        host = client[0] if client else "an unknown address"
        return 401, (
            f"protected mode: no token is set, so {path} accepts requests from this machine only (loopback), and this "
            f"one came from {host}. Set a token (service.token in params.yaml, or the environment variable "
            "RECFLOW_SERVICE_TOKEN), restart, and send `Authorization: Bearer <token>`; or, to let anyone who reaches "
            "the service write without one, set service.protected_mode: false"
        )
    return None


class RequestGuard:
    """`post_routes` take JSON bodies, `write_routes` (some of them) need `access()`; `limit()` gives the largest
    body in bytes, `readiness()` whether the service is ready and each part's state. The callables are asked per
    request, so they may read settings that exist only once the service started."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        post_routes: Sequence[str],
        write_routes: Sequence[str],
        access: Callable[[], WriteAccess],
        limit: Callable[[], int],
        readiness: Readiness,
    ) -> None:
        self.app = app
        self.post_routes = frozenset(post_routes)
        self.write_routes = frozenset(write_routes)
        self.access = access
        self.limit = limit
        self.readiness = readiness

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path == "/readyz" and method == "GET":
            await self._readyz(scope, receive, send)
            return
        if method != "POST" or path not in self.post_routes:
            await self.app(scope, receive, send)
            return
        content_type, declared, authorization = _guarded_headers(scope["headers"])
        if path in self.write_routes:
            denied = write_denied(self.access(), path, scope.get("client"), authorization)
            if denied is not None:
                status, problem = denied
                challenge = {"WWW-Authenticate": "Bearer"} if status == 401 else None  # RFC 9110: 401 names a scheme
                await JSONResponse({"error": problem}, status_code=status, headers=challenge)(scope, receive, send)
                return
        media = content_type.split(";")[0].strip().lower()
        if media != "application/json":
            problem = f"content-type {media!r} is not supported: send application/json"
            await JSONResponse({"error": problem}, status_code=415)(scope, receive, send)
            return
        limit = self.limit()
        body = b""
        more = not declared.isdigit() or int(declared) <= limit  # a declared size over the limit is not read
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False) and len(body) <= limit
        if (declared.isdigit() and int(declared) > limit) or len(body) > limit:
            problem = f"request body larger than {limit} bytes (service.max_body_bytes)"
            await JSONResponse({"error": problem}, status_code=413)(scope, receive, send)
            return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _readyz(self, scope: Scope, receive: Receive, send: Send) -> None:
        ready, checks = await run_in_threadpool(self.readiness)  # pings may wait on the network
        await JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)(scope, receive, send)


def _guarded_headers(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str, str, str]:
    """The request's content type (application/json when absent), declared length and authorization ("" when
    absent), read without decoding the other headers (the guard runs on every request)."""
    content_type, length, authorization = "application/json", "", ""
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-type":
            content_type = value.decode("latin-1")
        elif lowered == b"content-length":
            length = value.decode("latin-1")
        elif lowered == b"authorization":
            authorization = value.decode("latin-1")
    return content_type, length, authorization
