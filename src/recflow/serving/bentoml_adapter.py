"""The one place recflow reaches into BentoML beyond its public API; when BentoML changes, this is what to adapt
(tests/unit/test_httpguard.py, tests/unit/test_bentoml_adapter.py and tests/integration/test_service.py fail first).

- `model_store(folder)`: BentoML's model store in a given folder. The registry (`recflow.ops.registry`) hands it
  to the public `bentoml.models` calls (`_model_store=`), so it saves into the project's store whatever home
  BentoML resolved for this process.
- `CancellingTimeoutMiddleware`: BentoML's per-request timeout (`traffic.timeout`) with its timer cancelled when
  the request ends. `use_cancelling_timeout(service)` makes one service build its HTTP app with it instead of
  BentoML's own, when the service starts (`to_asgi`, which `bentoml serve`'s workers and the tests call).
- `trace_only_when_exported(service)`: BentoML 1.4 puts OpenTelemetry's ASGI middleware in front of every app, with
  no option to leave it out, and samples nothing unless a tracing exporter is configured (`tracing.sample_rate`
  defaults to 0). Unsampled, it still builds a span and wraps every ASGI message: 8% of the worker's time under
  `wrk -c4` POST /recommend on an ml-100k-sized model (py-spy), a quarter of all the HTTP stack cost. The
  service's app is built without it when no exporter would receive a span; with `tracing` configured it stays.
- `document_answers(service, answers)`: the answers each operation of the service's OpenAPI spec (`/docs.json`)
  lists besides its success. BentoML 1.4 gives every `@bentoml.api` the same three (400, 404, 500, whose schemas
  say `detail` is a string, while its validation errors send a list) and has no option to declare others, so the
  generated spec is amended here, and only here. Request schemas need no amending: they are the pydantic models'.

Each changes one service object only (its class becomes a subclass): BentoML itself is not patched, so other services
and apps in the same process keep BentoML's behaviour.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import attrs
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.models.model import ModelStore
from bentoml._internal.server.http import traffic
from bentoml._internal.service.openapi.specification import (
    MediaType,
    OpenAPISpecification,
    Operation,
    Reference,
    Response,
)
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from pydantic import BaseModel
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

__all__ = [
    "Answer",
    "CancellingTimeoutMiddleware",
    "ModelStore",
    "document_answers",
    "model_store",
    "trace_only_when_exported",
    "tracing_exported",
    "use_cancelling_timeout",
]

REF_TEMPLATE = "#/components/schemas/{model}"


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
    BentoML's timeout, with the same options, before the app handles anything."""
    _adapted(service)._recflow_cancelling_timeout = True


def tracing_exported() -> bool:
    """Whether BentoML's configuration (the service's `tracing`, or BENTOML_CONFIG) sends sampled spans anywhere."""
    tracing = BentoMLContainer.tracing
    return tracing.exporter_type.get() is not None and (tracing.sample_rate.get() or 0.0) > 0.0


def trace_only_when_exported(service: Any) -> None:
    """Make `service` (a `@bentoml.service` class) build its app without OpenTelemetry's middleware unless
    `tracing_exported()` when the app is built. Without it BentoML's answers lose the `X-BentoML-Request-ID` header
    and its log records the ids of a trace that was never recorded; nothing else reads them."""
    _adapted(service)._recflow_trace_only_when_exported = True


@dataclass(frozen=True)
class Answer:
    """One answer an operation documents: what it means, and the pydantic model of its JSON body (None: no body)."""

    description: str
    body: type[BaseModel] | None = None


def document_answers(
    service: Any, answers: Mapping[str, Mapping[int, Answer]], *, bearer: Collection[str] = ()
) -> None:
    """Make the OpenAPI spec of `service` (a `@bentoml.service` class) list, for each operation named like
    "POST /events", exactly these answers besides the success BentoML documents (which a 200 here replaces), and
    mark the request body of each such `@bentoml.api` required when its model has a required field. The bodies'
    schemas join the spec's components under their model names. The operations in `bearer` (also in `answers`)
    declare that they need a bearer token (security scheme "bearer")."""
    adapted = _adapted(service)
    adapted._recflow_answers = dict(answers)
    adapted._recflow_bearer = frozenset(bearer)


def with_answers(
    spec: OpenAPISpecification, answers: Mapping[str, Mapping[int, Answer]], bearer: Collection[str] = ()
) -> OpenAPISpecification:
    """`spec` with the answers of `document_answers` (a new spec: BentoML caches parts of the one it builds)."""
    components: Any = spec.components  # BentoML passes a dict where the attrs class declares Components
    if bearer and not isinstance(components, dict):
        raise TypeError("BentoML's Components has no securitySchemes: adapt with_answers to this BentoML version")
    schemas = dict(components["schemas"] if isinstance(components, dict) else components.schemas)
    paths = dict(spec.paths)
    for name, statuses in answers.items():
        method, _, path = name.partition(" ")
        item = paths.get(path)
        operation = None if item is None else getattr(item, method.lower(), None)
        if item is None or operation is None:
            raise KeyError(f"{name!r} is not an operation of the service's OpenAPI spec (a name: 'POST /events')")
        documented = operation.responses if isinstance(operation, Operation) else operation["responses"]
        responses: dict[str | int, Any] = {
            str(status): response
            for status, response in documented.items()
            if str(status).startswith("2") and int(status) not in statuses
        }
        for status, answer in sorted(statuses.items()):
            responses[str(status)] = _response(answer, schemas)
        if isinstance(operation, Operation):
            if name in bearer:
                raise ValueError(f"{name!r}: only an @bentoml.api operation can declare the bearer token here")
            operation = attrs.evolve(operation, responses=responses)
        else:  # an @bentoml.api
            operation = {**operation, "responses": responses}
            if name in bearer:
                operation["security"] = [{"bearer": []}]
            if "requestBody" in operation:
                operation["requestBody"] = _required_when_it_is(operation["requestBody"])
        paths[path] = attrs.evolve(item, **{method.lower(): operation})  # type: ignore[arg-type]
    if isinstance(components, dict):
        schemes = {"bearer": {"type": "http", "scheme": "bearer"}} if bearer else {}
        components = {**components, "schemas": schemas, **({"securitySchemes": schemes} if schemes else {})}
    else:
        components = attrs.evolve(components, schemas=schemas)
    return attrs.evolve(spec, paths=paths, components=components)


def _required_when_it_is(body: dict[str, Any]) -> dict[str, Any]:
    """BentoML reads a missing JSON body as `{}`, which fails when its model has a required field (400); it does not
    say so in the spec."""
    schema = getattr(body["content"].get("application/json"), "schema", None)
    return {**body, "required": True} if getattr(schema, "required", None) else body


def _response(answer: Answer, schemas: dict[str, Any]) -> Response:
    if answer.body is None:
        return Response(description=answer.description)
    schema = answer.body.model_json_schema(ref_template=REF_TEMPLATE)
    schemas.update(schema.pop("$defs", {}))
    schemas[answer.body.__name__] = schema
    media = MediaType(schema=Reference(REF_TEMPLATE.format(model=answer.body.__name__)))
    return Response(description=answer.description, content={"application/json": media})


def _adapted(service: Any) -> Any:
    """The class of `service` (a `@bentoml.service` class object), made once a subclass with recflow's hooks: its
    `to_asgi` swaps the timeout middleware and leaves out unexported tracing in the app it has just built, and its
    `openapi_spec` adds the documented answers. Only this service object changes."""
    base = type(service)
    if getattr(base, "_recflow_adapted", False):
        return base

    class _Adapted(base):  # type: ignore[valid-type, misc]
        __slots__ = ()  # the same layout, so the service object can take this class
        _recflow_adapted = True
        _recflow_cancelling_timeout = False
        _recflow_trace_only_when_exported = False
        _recflow_answers: Mapping[str, Mapping[int, Answer]] = {}
        _recflow_bearer: Collection[str] = frozenset()

        def to_asgi(self, is_main: bool = True) -> Any:
            app = super().to_asgi(is_main=is_main)
            if self._recflow_cancelling_timeout:
                app.user_middleware = [
                    Middleware(CancellingTimeoutMiddleware, *m.args, **m.kwargs)
                    if m.cls is traffic.TimeoutMiddleware
                    else m
                    for m in app.user_middleware
                ]
            if self._recflow_trace_only_when_exported and not tracing_exported():
                app.user_middleware = [m for m in app.user_middleware if m.cls is not OpenTelemetryMiddleware]
            return app

        @property
        def openapi_spec(self) -> OpenAPISpecification:
            return with_answers(super().openapi_spec, self._recflow_answers, self._recflow_bearer)

    _Adapted.__name__ = _Adapted.__qualname__ = base.__name__
    service.__class__ = _Adapted
    return _Adapted
