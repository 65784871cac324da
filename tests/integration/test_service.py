"""The BentoML service in-process, through its full ASGI stack (starlette's TestClient): answers, fold-in over
HTTP, tokens, bad input, hot reload; and the Redis user state shared by two workers.

The project is trained and deployed twice (a second version for the reload), then rolled back to the first.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
import pytest
import redis
import schemathesis
from bentoml._internal.server.http.traffic import TimeoutMiddleware as BentoMLTimeout
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from schemathesis import GenerationMode

with warnings.catch_warnings():
    # starlette 1.x deprecates its httpx-based TestClient in favour of httpx2, which is not installed here
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", UserWarning)
    from starlette.testclient import TestClient

from recflow.config import EventSettings, load_settings
from recflow.model.bundle import ModelBundle
from recflow.ops.registry import ModelVersion, deploy, production, rollback
from recflow.serving.bentoml_adapter import CancellingTimeoutMiddleware
from recflow.serving.online import OnlineRecommender
from recflow.serving.schemas import ErrorBody
from recflow.serving.userstate import RedisUserState

from ..servingkit import deploy_small_project, load_service

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SERVICE = {"service": {"token": TOKEN, "reload_check_seconds": 0, "max_body_bytes": 20_000, "max_events": 50}}
FUTURE = "2999-01-01T00:00:00Z"
EVENT = {"user_id": "u", "item_id": "i", "action": "view", "timestamp": 1795000000}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelVersion, ModelVersion]:
    """Two versions deployed (the second forced), then rolled back: production is the first."""
    root = tmp_path_factory.mktemp("service")
    first = deploy_small_project(root, **SERVICE)
    second = deploy_small_project(root, force=True, **SERVICE, als={"factors": 12, "tune": {"enabled": False}})
    rollback(load_settings(root / "params.yaml"), root=root, user="test")
    return root, first, second


@pytest.fixture(scope="module")
def client(project: tuple[Path, ModelVersion, ModelVersion]) -> Iterator[TestClient]:
    root = project[0]
    with load_service(root) as service, TestClient(service.to_asgi()) as client:
        yield client


def bundle_of(version: ModelVersion) -> ModelBundle:
    return ModelBundle.load(version.bundle_dir)


def settled(client: Any, body: dict[str, Any]) -> list[str]:
    """The answer once the item statistics count every event sent so far: a request after service.item_stats_seconds
    starts their refresh on a thread, and a later one sees it."""
    time.sleep(1.1)
    client.post("/recommend", json=body)
    time.sleep(0.5)
    return items(client.post("/recommend", json=body))


def items(response: Any) -> list[str]:
    return [entry["item_id"] for entry in response.json()["items"]]


def test_a_known_user_gets_the_two_stage_answer_of_the_production_version(client: TestClient, project: Any) -> None:
    first = project[1]
    bundle = bundle_of(first)
    user = str(bundle.user_ids[4])
    response = client.post("/recommend", json={"user_id": user, "k": 12})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == first.tag and body["strategy"] == "personalized"
    assert items(response) == bundle.recommend_ids([user], 12)[0]["items"]
    assert client.post("/recommend", json={"user_id": "someone-new"}).json()["strategy"] == "popular"


def test_events_fold_in_at_once_and_the_bought_item_is_excluded(client: TestClient, project: Any) -> None:
    root, first = project[0], project[1]
    bundle = bundle_of(first)
    user = str(bundle.user_ids[17])
    before = items(client.post("/recommend", json={"user_id": user, "k": 20}))
    bought = before[0]
    events = [
        {"user_id": user, "item_id": bought, "action": "purchase", "timestamp": "2026-11-24T08:00:00Z"},
        {"user_id": user, "item_id": "brand-new-item", "action": "view", "timestamp": 1795000000},
        {"user_id": user, "item_id": bought, "action": "view", "timestamp": "2999-01-01T00:00:00Z"},  # the future
    ]
    response = client.post("/events", json={"events": events}, headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["accepted"] == 2 and body["users_updated"] == 1 and body["unknown_items"] == ["brand-new-item"]
    assert [(r["index"], r["code"]) for r in body["rejected"]] == [(2, "future_timestamp")]
    after = items(client.post("/recommend", json={"user_id": user, "k": 20}))
    assert bought not in after and after != before
    # the accepted events went to the event log (the embedded spool) for the next training
    spool = root / load_settings(root / "params.yaml").eventlog.spool / "events.jsonl"
    logged = [json.loads(line) for line in spool.read_text().splitlines()]
    assert {(e["user_id"], e["item_id"]) for e in logged} >= {(user, bought), (user, "brand-new-item")}


def test_write_endpoints_need_the_token_and_read_endpoints_do_not(client: TestClient) -> None:
    event = {"user_id": "u", "item_id": "i", "action": "view", "timestamp": 1795000000}
    missing = client.post("/events", json={"events": [event]})
    assert missing.status_code == 401 and "bearer token" in missing.json()["error"]
    wrong = client.post("/events", json={"events": [event]}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403 and "wrong" in wrong.json()["error"]
    assert client.post("/reload", json={}).status_code == 401
    assert client.post("/recommend", json={"user_id": "u"}).status_code == 200
    # regression (issue 11): a body the schema forbids got 400 without the token; the caller is checked first
    assert client.post("/events", json={"events": []}).status_code == 401


@pytest.mark.parametrize(
    ("path", "body", "status", "names"),
    [
        ("/recommend", {"user_id": "u", "colour": "red"}, 400, "colour"),
        ("/recommend", {"user_id": "u", "k": "5"}, 400, "k"),
        ("/recommend", {"user_id": "u", "k": 0}, 400, "k"),
        ("/recommend", {"user_id": "u", "k": 201}, 400, "k"),
        ("/recommend", {"user_id": ""}, 400, "user_id"),
        ("/recommend", {"user_id": "   "}, 400, "user_id"),
        ("/recommend", {"k": 5}, 400, "user_id"),
        ("/recommend", {"user_id": "u", "exclude_seen": "no"}, 400, "exclude_seen"),
        ("/recommend", {"user_id": "u", "recent_events": [{"item_id": "i", "action": "x", "timestamp": 1}]}, 400,
         "recent_events"),
        ("/similar", {"item_id": "no-such-item"}, 404, "no-such-item"),
        ("/similar", {"item_id": "i", "k": -1}, 400, "k"),
        ("/events", {"events": []}, 400, "events"),
        ("/events", {"events": [{"user_id": "u", "item_id": "i", "action": "view"}]}, 400, "timestamp"),
        ("/events", {"events": [{"user_id": "u", "item_id": "i", "action": "view", "timestamp": 1, "x": 1}]}, 400,
         "x"),
        # what the schema states (params.yaml's actions and id length, RFC 3339, max_events) refuses the request whole
        ("/events", {"events": [{**EVENT, "user_id": ""}]}, 400, "user_id"),
        ("/events", {"events": [{**EVENT, "user_id": " \u3000"}]}, 400, "blank"),
        # an id over events.max_id_length (which the spec states as maxLength): 422 on every endpoint, refused whole
        ("/events", {"events": [EVENT, {**EVENT, "item_id": "i" * 257}]}, 422, "item_id has 257 characters"),
        ("/events", {"events": [{**EVENT, "event_id": "e" * 300}]}, 422, "event_id has 300 characters"),
        ("/recommend", {"user_id": "u" * 10_000}, 422, "user_id has 10000 characters, more than 256"),
        ("/recommend", {"user_id": "u", "recent_events": [{"item_id": "i" * 257, "action": "view", "timestamp": 1}]},
         422, "id_too_long"),
        ("/similar", {"item_id": "i" * 257}, 422, "events.max_id_length"),
        ("/events", {"events": [EVENT, {**EVENT, "action": "clik"}]}, 400, "add_to_cart"),
        ("/events", {"events": [{**EVENT, "timestamp": "2026-11-24T09:00:00"}]}, 400, "RFC 3339"),
        ("/events", {"events": [{**EVENT, "timestamp": "1795000000"}]}, 400, "RFC 3339"),
        ("/events", {"events": [{**EVENT, "timestamp": -1}]}, 400, "greater than or equal to 0"),
        ("/events", {"events": [EVENT] * 51}, 400, "at most 50 items"),
        ("/recommend", {"user_id": "u", "recent_events": [{"item_id": "i", "action": "view", "timestamp": 1}] * 51},
         400, "at most 50 items"),
        # what it cannot state (a timestamp in the future): 422 when nothing is left, naming the rule
        ("/events", {"events": [{**EVENT, "timestamp": FUTURE}]}, 422, "future_timestamp"),
        ("/recommend", {"user_id": "u", "recent_events": [{"item_id": "i", "action": "view", "timestamp": FUTURE}]},
         422, "future_timestamp"),
        ("/reload", {"force": True}, 400, "force"),
    ],
)  # fmt: skip
def test_bad_input_gets_a_4xx_naming_the_problem_in_the_one_error_shape(
    client: TestClient, path: str, body: dict[str, Any], status: int, names: str
) -> None:
    response = client.post(path, json=body, headers=AUTH)
    assert response.status_code == status, response.text
    assert names in response.text
    ErrorBody.model_validate(response.json())


def test_recflow_own_answers_and_bentomls_share_the_error_shape(client: TestClient) -> None:
    """Regression (issue 15): the spec said `detail` was a string, BentoML's validation errors send a list, and /events
    answered 422 with a different body than every other error."""
    answers = [
        client.post("/recommend", content=b'{"user_id": ', headers={"content-type": "application/json"}),  # BentoML
        client.post("/recommend", json={"user_id": "u" * 30_000}),  # the request guard
        client.post("/events", json={"events": [EVENT]}),  # the token check
        client.post("/similar", json={"item_id": "no-such-item"}),  # the service
        client.post("/events", json={"events": [{**EVENT, "timestamp": FUTURE}]}, headers=AUTH),  # the event contract
    ]
    assert [answer.status_code for answer in answers] == [400, 413, 401, 404, 422]
    bodies = [ErrorBody.model_validate(answer.json()) for answer in answers]
    assert [detail.loc for detail in bodies[-1].detail] == [["events", 0]]
    assert bodies[-1].detail[0].type == "future_timestamp"


def test_malformed_oversized_and_non_json_bodies_are_refused(client: TestClient) -> None:
    malformed = client.post("/recommend", content=b'{"user_id": ', headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and "json" in malformed.text.lower()
    big = client.post("/recommend", json={"user_id": "u" * 30_000})
    assert big.status_code == 413 and "max_body_bytes" in big.json()["error"]
    form = client.post("/recommend", content=b"user_id=u", headers={"content-type": "multipart/form-data; b=x"})
    assert form.status_code == 415 and "application/json" in form.json()["error"]


def test_model_readyz_and_openapi_describe_the_service(client: TestClient, project: Any) -> None:
    first = project[1]
    model = client.get("/model").json()
    assert model["tag"] == first.tag and model["metrics"]["ndcg@10"] == first.metrics["ndcg@10"]
    assert model["data_version"] and model["trained_at"] == first.trained_at
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["event_log"] == "ok"
    spec = client.get("/docs.json").json()
    for path in ("/recommend", "/events", "/similar", "/reload", "/model"):
        assert path in spec["paths"]
    recommend = spec["paths"]["/recommend"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert recommend["properties"]["k"]["maximum"] == 200 and recommend["additionalProperties"] is False
    # the event contract's rules come from the project's params.yaml
    settings = load_settings(project[0] / "params.yaml")
    event = spec["components"]["schemas"]["Event"]["properties"]
    assert event["action"]["enum"] == list(settings.events.actions)
    assert {member.get("maxLength") for member in event["user_id"]["oneOf"]} == {settings.events.max_id_length, None}
    events = spec["paths"]["/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert events["properties"]["events"]["maxItems"] == settings.service.max_events == 50
    # every answer documented, every error with the one error body
    documented = {path: sorted(spec["paths"][path]["post"]["responses"]) for path in ("/events", "/similar")}
    assert documented == {
        "/events": ["200", "400", "401", "403", "413", "415", "422", "500", "503", "504"],
        "/similar": ["200", "400", "404", "413", "415", "422", "500", "503", "504"],
    }
    error = spec["paths"]["/events"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorBody"}
    assert spec["components"]["schemas"]["ErrorBody"]["properties"]["detail"]["type"] == "array"


def test_the_service_lets_finished_requests_go(client: TestClient) -> None:
    """BentoML's own timeout would hold each request for traffic.timeout seconds (see test_httpguard)."""
    middleware = [m.cls for m in client.app.user_middleware]  # type: ignore[attr-defined]
    assert CancellingTimeoutMiddleware in middleware and BentoMLTimeout not in middleware


def test_the_service_runs_no_tracing_middleware_when_no_span_is_exported(client: TestClient) -> None:
    """Unsampled OpenTelemetry spans cost ~8% of the service's time per request (see bentoml_adapter)."""
    assert OpenTelemetryMiddleware not in [m.cls for m in client.app.user_middleware]  # type: ignore[attr-defined]


def test_the_timeout_swap_stays_inside_the_recflow_service(client: TestClient) -> None:
    """Regression: bentos/service.py patched BentoML when imported, so every app built later in the process (other
    services, other tests) got recflow's middleware. Now only the recflow service's own app has it."""

    @bentoml.service(name="unrelated")
    class Unrelated:
        @bentoml.api
        def echo(self, text: str) -> str:
            return text

    middleware = [m.cls for m in Unrelated.to_asgi().user_middleware]  # type: ignore[attr-defined]
    assert BentoMLTimeout in middleware and CancellingTimeoutMiddleware not in middleware


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
# schemathesis 4.32's `openapi_cases` strategy uses the `random` module for some operations, which hypothesis
# deprecates (a warning, here an error); the generated requests are still valid test input
@pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies:hypothesis.errors.HypothesisDeprecationWarning"
)
def test_no_request_the_openapi_spec_allows_or_forbids_gets_a_5xx(client: TestClient, mode: GenerationMode) -> None:
    """schemathesis generates requests for every operation of the service's own OpenAPI spec: valid ones and,
    in NEGATIVE mode, ones that break it (wrong types, missing or unknown fields, out-of-range numbers). Each is
    sent with and without the token, through the full ASGI stack; none may get a 5xx. (Runs before the reload
    test, which changes the version served.)"""
    schema = schemathesis.openapi.from_dict(client.get("/docs.json").json())
    # /metrics answers only under `bentoml serve` (BentoML's metrics client is set up by its server; see
    # test_bentoml_serve.py), so it is left out here
    operations = [op for op in (result.ok() for result in schema.get_all_operations()) if op.path != "/metrics"]
    assert {op.path for op in operations} >= {"/recommend", "/events", "/similar", "/reload", "/model"}
    seen: list[int] = []

    @settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        operation = data.draw(st.sampled_from(operations))
        case = data.draw(operation.as_strategy(generation_mode=mode))
        headers = AUTH if data.draw(st.booleans()) else {}
        request = case.as_transport_kwargs(base_url="http://testserver", headers=headers)
        request.pop("cookies", None)  # the spec has none; httpx deprecates per-request cookies
        if isinstance(request.get("data"), bytes | str):  # a raw (negative) body: httpx wants it as content
            request["content"] = request.pop("data")
        response = client.request(**request)
        seen.append(response.status_code)
        assert response.status_code < 500, f"{case.method} {case.path} {case.body!r} -> {response.text}"

    check()
    assert len(seen) >= 150
    if mode is GenerationMode.NEGATIVE:
        assert any(400 <= status < 500 for status in seen)


def test_a_promoted_version_is_swapped_in_without_dropping_a_request_and_rolled_back(
    client: TestClient, project: Any
) -> None:
    root, first, second = project
    settings = load_settings(root / "params.yaml")
    user = str(bundle_of(first).user_ids[4])
    before = settled(client, {"user_id": user, "k": 12})  # counting every event the earlier tests sent
    failures: list[int] = []
    versions: set[str] = set()
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            response = client.post("/recommend", json={"user_id": "someone", "k": 5})
            if response.status_code != 200:
                failures.append(response.status_code)
            versions.add(response.json().get("model_version", ""))

    worker = threading.Thread(target=hammer)
    worker.start()
    try:
        deploy(settings, root=root, user="test", force=True)  # models/bundle holds the second training
        assert production(settings, root).tag == second.tag
        reload = client.post("/reload", json={}, headers=AUTH)
    finally:
        stop.set()
        worker.join()
    assert reload.status_code == 200 and reload.json() == {
        "model_version": second.tag,
        "previous": first.tag,
        "changed": True,
    }
    assert failures == [] and versions <= {first.tag, second.tag}
    assert client.get("/model").json()["tag"] == second.tag
    assert client.post("/reload", json={}, headers=AUTH).json()["changed"] is False
    # rollback restores the previous version's answers, once the load's scan has counted the events held
    rollback(settings, root=root, user="test")
    assert client.post("/reload", json={}, headers=AUTH).json()["model_version"] == first.tag
    deadline = time.monotonic() + 30
    while (answer := items(client.post("/recommend", json={"user_id": user, "k": 12}))) != before:
        assert time.monotonic() < deadline, (answer, before)
        time.sleep(0.2)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = f"recflow-test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis()
    client.delete(*client.scan_iter(match=f"{prefix}*"), b"\x00changes:" + prefix.encode())  # hashes, change feed
    client.close()


def test_two_workers_share_the_user_state_in_redis(project: Any, redis_prefix: str) -> None:
    bundle = bundle_of(project[1])
    states = [RedisUserState("redis://127.0.0.1:6379/0", redis_prefix) for _ in range(2)]
    one, other = (OnlineRecommender(bundle, "v", state, EventSettings()) for state in states)
    user = str(bundle.user_ids[30])
    item = str(bundle.item_ids[bundle.popular_order[0]])
    before = other.recommend(user, 10)
    one.record_events([{"user_id": user, "item_id": item, "action": "purchase", "timestamp": 1795000000}])
    after = other.recommend(user, 10)  # the other worker sees the event and the folded vector
    assert after != before and item not in [i for i, _ in after.items]
    assert other.state.vectors("v", [user])[user].n_events == 1
    restarted = OnlineRecommender(
        bundle, "v", RedisUserState("redis://127.0.0.1:6379/0", redis_prefix), EventSettings()
    )
    assert restarted.recommend(user, 10) == after
    for recommender in (one, other, restarted):
        recommender.state.close()
