"""The one place recflow reaches into BentoML beyond its public API; when BentoML changes, this is what to adapt
(tests/unit/test_httpguard.py and tests/integration/test_service.py fail first).

- `model_store(folder)`: BentoML's model store in a given folder. The registry (`recflow.ops.registry`) hands it
  to the public `bentoml.models` calls (`_model_store=`), so it saves into the project's store whatever home
  BentoML resolved for this process.
- `CancellingTimeoutMiddleware`: BentoML's per-request timeout (`traffic.timeout`) with its timer cancelled when
  the request ends. `use_cancelling_timeout(service)` makes one service build its HTTP app with it instead of
  BentoML's own, when the service starts (`to_asgi`, which `bentoml serve`'s workers and the tests call): BentoML
  itself is not patched, so other services and apps in the same process keep BentoML's middleware.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
from pathlib import Path
from typing import Any

from bentoml._internal.models.model import ModelStore
from bentoml._internal.server.http import traffic
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

__all__ = ["CancellingTimeoutMiddleware", "ModelStore", "model_store", "use_cancelling_timeout"]


def model_store(folder: Path) -> ModelStore:
    """BentoML's model store in `folder` (created when missing)."""
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")  # no usage reports from a library call (read once)
    folder.mkdir(parents=True, exist_ok=True)
    return ModelStore(folder)


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


def use_cancelling_timeout(service: Any) -> None:
    """Make `service` (a `@bentoml.service` class) build its app with `CancellingTimeoutMiddleware` in place of
    BentoML's timeout, with the same options. Only this service object changes: its class becomes a subclass
    whose `to_asgi` swaps the middleware in the app it has just built, before the app handles anything."""
    base = type(service)
    if getattr(base, "_recflow_cancelling_timeout", False):
        return

    class _WithCancellingTimeout(base):  # type: ignore[valid-type, misc]
        __slots__ = ()  # the same layout, so the service object can take this class
        _recflow_cancelling_timeout = True

        def to_asgi(self, is_main: bool = True) -> Any:
            app = super().to_asgi(is_main=is_main)
            app.user_middleware = [
                Middleware(CancellingTimeoutMiddleware, *m.args, **m.kwargs)
                if m.cls is traffic.TimeoutMiddleware
                else m
                for m in app.user_middleware
            ]
            return app

    _WithCancellingTimeout.__name__ = _WithCancellingTimeout.__qualname__ = base.__name__
    service.__class__ = _WithCancellingTimeout
