"""ASGI middleware in front of the HTTP service (bentos/service.py): JSON-only request bodies within a size limit
on the API routes, answered with 415 / 413 that name the problem instead of a parser error deep in the framework,
and a /readyz whose JSON body says which part is not ready. Plain ASGI (starlette): the request timeout that
replaces BentoML's own is in `recflow.serving.bentoml_adapter`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

Readiness = Callable[[], tuple[bool, dict[str, str]]]


class RequestGuard:
    """`limit()` gives the largest body in bytes, `readiness()` whether the service is ready and each part's
    state; both are asked per request, so they may read settings that exist only once the service started."""

    def __init__(
        self, app: ASGIApp, *, post_routes: Sequence[str], limit: Callable[[], int], readiness: Readiness
    ) -> None:
        self.app = app
        self.post_routes = frozenset(post_routes)
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
        content_type, declared = _body_headers(scope["headers"])
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


def _body_headers(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str, str]:
    """The request's content type (application/json when absent) and declared length ("" when absent), read
    without decoding the other headers (the guard runs on every request)."""
    content_type, length = "application/json", ""
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-type":
            content_type = value.decode("latin-1")
        elif lowered == b"content-length":
            length = value.decode("latin-1")
    return content_type, length
