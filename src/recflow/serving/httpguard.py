"""ASGI middleware in front of the HTTP service (bentos/service.py): JSON-only request bodies within a size limit
on the API routes, answered with 415 / 413 that name the problem instead of a parser error deep in the framework,
and a /readyz whose JSON body says which part is not ready. Also a corrected copy of BentoML's request timeout
(`use_cancelling_timeout`)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Sequence

from bentoml._internal.server.http import traffic
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
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        media = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if media != "application/json":
            problem = f"content-type {media!r} is not supported: send application/json"
            await JSONResponse({"error": problem}, status_code=415)(scope, receive, send)
            return
        limit = self.limit()
        declared = headers.get("content-length", "")
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


class CancellingTimeoutMiddleware(traffic.TimeoutMiddleware):
    """BentoML 1.4's per-request timeout (`traffic.timeout`), with the timer cancelled when the request ends and
    holding nothing of the request.

    BentoML's own never cancels it, so each finished request's context (its tracing span, futures, locks: ~20
    objects) stays alive until the timeout passes: at 200 req/s with a 30 s timeout, ~120k live objects that every
    full garbage collection walks with the GIL held, ~70 ms each time, which was the service's p99.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        # an empty context: a cancelled timer may wait in the loop's queue a while, and must not hold the request's
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter, context=contextvars.Context())

        async def answered(message: Message) -> None:
            if not waiter.done():
                waiter.set_result(None)
            await send(message)

        request = asyncio.ensure_future(self.app(scope, receive, answered))
        try:
            await waiter
        except TimeoutError:
            if request.cancel():
                problem = f"Not able to process the request in {self.timeout} seconds"
                await JSONResponse({"error": problem}, status_code=504)(scope, receive, send)
        else:
            await request
        finally:
            timer.cancel()


def use_cancelling_timeout() -> None:
    """Make BentoML build its apps with `CancellingTimeoutMiddleware`: it looks the class up in its `traffic`
    module each time it assembles an app, so this must run before the service starts (bentos/service.py does it
    at import)."""
    traffic.TimeoutMiddleware = CancellingTimeoutMiddleware  # type: ignore[misc]
