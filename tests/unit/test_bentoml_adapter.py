"""`document_answers` (the answers an operation lists in the OpenAPI spec BentoML generates) and
`trace_only_when_exported`, each on a service of its own."""

from __future__ import annotations

import bentoml
import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from pydantic import BaseModel

from recflow.serving import bentoml_adapter
from recflow.serving.bentoml_adapter import Answer, document_answers, trace_only_when_exported, tracing_exported


class Problem(BaseModel):
    error: str


class Query(BaseModel):
    text: str


def service() -> bentoml.Service:  # type: ignore[type-arg]
    @bentoml.service(name="documented")
    class Documented:
        @bentoml.api(input_spec=Query)
        def echo(self, text: str) -> str:
            return text

    return Documented


def test_an_operation_lists_exactly_the_documented_answers_with_their_bodies() -> None:
    documented = service()
    document_answers(
        documented, {"POST /echo": {400: Answer("bad", Problem), 418: Answer("teapot")}}, bearer=["POST /echo"]
    )
    spec = documented.openapi_spec.asdict()
    echo = spec["paths"]["/echo"]["post"]
    # BentoML's own 400/404/500 (with a string `detail`) are replaced; its 200 stays
    assert sorted(echo["responses"]) == ["200", "400", "418"]
    assert echo["responses"]["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Problem"}
    assert "content" not in echo["responses"]["418"]
    assert spec["components"]["schemas"]["Problem"]["required"] == ["error"]
    assert echo["requestBody"]["required"] is True  # Query has a required field: BentoML answers 400 without a body
    assert echo["security"] == [{"bearer": []}]
    assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}


def test_an_unknown_operation_is_an_error_not_ignored() -> None:
    documented = service()
    document_answers(documented, {"POST /ehco": {400: Answer("bad", Problem)}})
    with pytest.raises(KeyError, match="POST /ehco"):
        documented.openapi_spec  # noqa: B018


def test_other_services_keep_bentomls_spec() -> None:
    document_answers(service(), {"POST /echo": {400: Answer("bad", Problem)}})
    untouched = service().openapi_spec.asdict()["paths"]["/echo"]["post"]
    responses = {str(status): response for status, response in untouched["responses"].items()}
    assert sorted(responses) == ["200", "400", "404", "500"]
    assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("InvalidArgument")


def middleware_of(app: bentoml.Service) -> list[type]:  # type: ignore[type-arg]
    return [m.cls for m in app.to_asgi().user_middleware]  # type: ignore[attr-defined]


def test_unexported_tracing_is_left_out_of_the_app_and_only_of_that_service() -> None:
    """By default BentoML samples no span (tracing.sample_rate 0, no exporter), yet its OpenTelemetry middleware
    cost ~8% of the service's time per request (py-spy under wrk); other services keep it."""
    traced_only_when_exported = service()
    trace_only_when_exported(traced_only_when_exported)
    assert not tracing_exported()
    assert OpenTelemetryMiddleware not in middleware_of(traced_only_when_exported)
    assert OpenTelemetryMiddleware in middleware_of(service())


def test_exported_tracing_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    traced = service()
    trace_only_when_exported(traced)
    monkeypatch.setattr(bentoml_adapter, "tracing_exported", lambda: True)
    assert OpenTelemetryMiddleware in middleware_of(traced)
