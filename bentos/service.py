"""recflow's HTTP service: the production model version, with each user's newest events folded in.

`bentoml serve` in this folder, with no environment variables, serves the production version of the project
this folder sits in (the project root is the parent folder, or RECFLOW_PROJECT; it reads params.yaml there).
The service only adapts HTTP to library calls: recommendations and fold-in live in `recflow.serving.online`, the
user state in `recflow.serving.userstate`, versions in `recflow.ops.registry`, the event log in `recflow.stream.log`.
See README.md beside this file for the endpoints, the error answers and the choices made.
"""

from __future__ import annotations

import os

# Before numpy is imported: OpenBLAS threads make the small solves and dot products several times slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import gc
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml
from bentoml.exceptions import BentoMLException
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from recflow.config import EventSettings, ServiceSettings, Settings, load_settings
from recflow.errors import RecflowError, UserStateUnavailableError
from recflow.events.contract import Rejection
from recflow.events.rules import oversized_ids
from recflow.ops.registry import ModelVersion, load_production_bundle, production, production_file
from recflow.serving.bentoml_adapter import (
    Answer,
    document_answers,
    trace_only_when_exported,
    use_cancelling_timeout,
)
from recflow.serving.httpguard import RequestGuard, WriteAccess
from recflow.serving.online import OnlineRecommender, Recommendation
from recflow.serving.schemas import (
    ErrorBody,
    EventsResponse,
    ModelResponse,
    Readiness,
    RecommendResponse,
    Rejected,
    ReloadResponse,
    ScoredItem,
    SimilarResponse,
    request_models,
)
from recflow.serving.userstate import open_user_state
from recflow.stream.log import open_event_log

logger = logging.getLogger("recflow.service")

POST_ROUTES = ("/recommend", "/events", "/similar", "/reload")
WRITE_ROUTES = ("/events", "/reload")  # need the bearer token, or a loopback client in protected mode (httpguard)
# More recent_events than this are validated and folded in off the event loop; up to it they cost less than the
# thread hop (row-wise validation: 0.08 ms for one event, ~1.2 ms for 100; benchmarks/bench_validation.py).
INLINE_RECENT_EVENTS = 32


def project_root() -> Path:
    """The project this service serves: RECFLOW_PROJECT, else the parent of the folder holding this file."""
    return Path(os.environ.get("RECFLOW_PROJECT") or Path(__file__).resolve().parent.parent).resolve()


def project_settings(root: Path) -> tuple[Settings, ServiceSettings]:
    """The project's settings (defaults without params.yaml) and the service's, with the environment's overrides."""
    params = root / "params.yaml"
    settings = load_settings(params) if params.exists() else Settings()
    return settings, settings.service.resolved(os.environ)


# -- the service -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Live:
    """The model version being served; replaced as a whole (one attribute assignment) on reload."""

    recommender: OnlineRecommender
    version: ModelVersion


def _error(ctx: bentoml.Context, status: int, message: str, detail: list[dict[str, Any]] | None = None) -> JSONResponse:
    """An answer in the service's one error shape (`ErrorBody`, as BentoML's validation errors)."""
    ctx.response.status_code = status
    body: dict[str, Any] = {"error": message}
    if detail:
        body["detail"] = detail
    return JSONResponse(body, status_code=status)


def _rejections(field: str, rejected: list[Rejection]) -> list[dict[str, Any]]:
    """The event contract's rejections as error details: where (the event's position), why, and the code."""
    return [{"loc": [field, r.record - 1], "msg": r.reason, "type": r.code} for r in rejected]


def _oversized(
    ctx: bentoml.Context, settings: EventSettings, records: Iterable[tuple[list[str | int], Mapping[str, Any]]]
) -> JSONResponse | None:
    """422 naming every id longer than events.max_id_length in these parts of a request (each with its location),
    before anything else is done with it; None when there is none."""
    detail = [
        {"loc": [*loc, name], "msg": why, "type": "id_too_long"}
        for loc, record in records
        for name, why in oversized_ids(record, settings)
    ]
    if not detail:
        return None
    message = f"{len(detail)} id(s) longer than events.max_id_length ({settings.max_id_length}): the request is refused"
    return _error(ctx, 422, message, detail)


def _freeze_heap() -> None:
    """Move the objects alive now (libraries, the loaded model) out of the garbage collector's reach. A full
    collection otherwise walks all of them (~300k objects, 120-160 ms with the GIL held) every few seconds under
    load, which was the whole p99 at 200 req/s. Reference counting still frees them."""
    gc.collect()
    gc.freeze()


def _prune(recommender: OnlineRecommender) -> None:
    """Drop from the user state what this version was trained on (a thread of its own, started on each load)."""
    try:
        recommender.prune_state()
    except Exception:  # the state stays as it was: reads still prune each user they meet, the next version the rest
        logger.exception("pruning the user state for %s failed", recommender.version)


admin = FastAPI(title="recflow admin", docs_url=None, redoc_url=None, openapi_url=None)
try:  # BentoML starts the workers, and builds the API from the request models, before any worker runs
    SETTINGS, CONFIG = project_settings(project_root())
except RecflowError as exc:  # say what to fix in params.yaml, not where the import failed
    raise SystemExit(f"recflow: {exc}") from None
# the request bodies carry params.yaml's limits (actions, id length, k_max, max_events): the spec follows the project
REQUESTS = request_models(SETTINGS.events, CONFIG)


@bentoml.service(
    name="recflow", workers=CONFIG.workers, traffic={"timeout": 30}, logging={"access": {"enabled": False}}
)
@bentoml.asgi_app(admin, path="/")
class Recommender:
    def __init__(self) -> None:
        self.root = project_root()
        self.settings, self.config = project_settings(self.root)
        self.state = open_user_state(
            self.config.redis_url, self.config.redis_prefix, self.root / self.config.state_path
        )
        self.event_log = open_event_log(self.settings.eventlog, self.root)
        self.live: Live | None = None
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._pointer_mtime: float | None = None
        try:
            self.reload_production()
        except RecflowError as exc:
            logger.error("cannot load the production model: %s", exc)
        if self.config.reload_check_seconds > 0:
            threading.Thread(target=self._watch, name="recflow-reload", daemon=True).start()
        if not self.config.token:
            who = "loopback clients only" if self.config.protected_mode else "anyone (service.protected_mode: false)"
            logger.warning("no service.token: POST /events and /reload accept %s", who)

    # -- model versions ---------------------------------------------------------------------------------

    def reload_production(self) -> ReloadResponse:
        """Serve the production version if it is not the one served; the swap is one assignment, so a request
        in flight finishes on the version it started with."""
        with self._reload_lock:
            previous = None if self.live is None else self.live.version.tag
            current = production(self.settings, self.root)
            if current is None or current.tag == previous:
                return ReloadResponse(model_version=previous, previous=previous, changed=False)
            version, bundle = load_production_bundle(self.settings, self.root)
            recommender = OnlineRecommender(
                bundle, version.tag, self.state, self.settings.events,
                item_stats_seconds=self.config.item_stats_seconds,
            )  # fmt: skip
            self.live = Live(recommender, version)
            _freeze_heap()
            logger.info("serving %s (was %s)", version.tag, previous)
            # the events this version was trained on leave the user state, beside the requests (seconds per
            # million held events); a user read meanwhile is pruned on the way
            threading.Thread(target=_prune, args=(recommender,), name="recflow-prune", daemon=True).start()
            return ReloadResponse(model_version=str(version.tag), previous=previous, changed=True)

    def _watch(self) -> None:
        """Reload when the production pointer file changes (one stat() per check)."""
        pointer = production_file(self.settings, self.root)
        while not self._stop.wait(self.config.reload_check_seconds):
            try:
                mtime = pointer.stat().st_mtime if pointer.exists() else None
                if mtime != self._pointer_mtime:
                    self.reload_production()
                    self._pointer_mtime = mtime
            except Exception:  # the watcher must outlive a bad version: keep serving the current one
                logger.exception("checking the production version failed; still serving the current one")

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self._stop.set()
        self.state.close()

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """Whether every part works, and what is wrong with each that does not."""
        checks = {"model": "ok" if self.live else "no model version is deployed: run `recflow deploy`"}
        for name, part in (("user_state", self.state), ("event_log", self.event_log)):
            try:
                part.ping()
                checks[name] = "ok"
            except RecflowError as exc:
                checks[name] = f"unavailable: {exc}"
        return all(v == "ok" for v in checks.values()), checks

    def _live(self, ctx: bentoml.Context) -> Live | JSONResponse:
        if self.live is None:
            return _error(ctx, 503, "no model version is deployed: run `recflow deploy`, then POST /reload")
        return self.live

    # -- endpoints --------------------------------------------------------------------------------------

    @bentoml.api(input_spec=REQUESTS.recommend)
    async def recommend(
        self, user_id: str, k: int, exclude_seen: bool, recent_events: list[BaseModel], ctx: bentoml.Context
    ) -> RecommendResponse:
        """Top-k items for a user: ALS candidates from the user's (folded-in) vector, reranked; items the user
        had are excluded unless exclude_seen is false. Unknown users without history get popular items."""
        records = [event.model_dump(exclude_none=True) for event in recent_events]
        asked: list[tuple[list[str | int], Mapping[str, Any]]] = [([], {"user_id": user_id})]
        asked.extend((["recent_events", i], r) for i, r in enumerate(records))
        too_long = _oversized(ctx, self.settings.events, asked)
        if too_long is not None:
            return too_long  # type: ignore[return-value]
        live = self._live(ctx)
        if isinstance(live, JSONResponse):
            return live  # type: ignore[return-value]
        recommender = live.recommender

        def ask() -> Recommendation | list[Rejection]:
            recent, rejected = recommender.validate_recent(user_id, records) if records else ([], [])
            if rejected:  # rules the schema cannot state (a timestamp in the future)
                return rejected
            return recommender.recommend(user_id, k, exclude_seen=exclude_seen, recent=recent)

        try:
            # Scoring alone (~2 ms of numpy and LightGBM) runs on the event loop: a thread hop, and the GIL handed
            # back and forth, cost more than they save (p99 at 200 req/s 7.0 -> 4.4 ms). A Redis user state may
            # wait on the network, and the loop must not, so then it runs in a thread; so do many recent_events.
            off_loop = self.config.redis_url or len(records) > INLINE_RECENT_EVENTS
            answer = await run_in_threadpool(ask) if off_loop else ask()
        except UserStateUnavailableError as exc:
            return _error(ctx, 503, str(exc))  # type: ignore[return-value]
        if isinstance(answer, list):
            message = f"{len(answer)} of the recent_events break the event contract"
            return _error(ctx, 422, message, _rejections("recent_events", answer))  # type: ignore[return-value]
        items = [ScoredItem(item_id=i, score=s) for i, s in answer.items]
        return RecommendResponse(user_id=user_id, items=items, model_version=live.recommender.version,
                                 strategy=answer.strategy)  # fmt: skip

    @bentoml.api(input_spec=REQUESTS.events)
    def events(self, events: list[BaseModel], ctx: bentoml.Context) -> EventsResponse:
        """Validate events with the event store's rules, append the accepted ones to the event log, and fold
        every affected user's vector in. An event that breaks a rule the schema cannot state is listed in
        `rejected`; 422 when no event was accepted, or when an id is longer than events.max_id_length (nothing is
        kept). The bearer token (or, without one, a loopback client) was checked before the body was read."""
        records = [event.model_dump(exclude_none=True) for event in events]
        too_long = _oversized(ctx, self.settings.events, ((["events", i], r) for i, r in enumerate(records)))
        if too_long is not None:
            return too_long  # type: ignore[return-value]
        live = self._live(ctx)
        if isinstance(live, JSONResponse):
            return live  # type: ignore[return-value]
        recommender = live.recommender
        batch = recommender.validate_events(records)
        try:
            if batch.accepted.num_rows:  # logged first: what the service keeps, the next training sees
                accepted = [{k: v for k, v in row.items() if v is not None} for row in batch.accepted.to_pylist()]
                self.event_log.append(accepted)
            outcome = recommender.apply_events(batch)
        except RecflowError as exc:  # event log or user state unreachable: nothing was folded in
            return _error(ctx, 503, f"events not accepted, retry later: {exc}")  # type: ignore[return-value]
        if outcome.accepted == 0:
            message = f"no event was accepted: each of the {len(events)} breaks the event contract (see detail)"
            return _error(ctx, 422, message, _rejections("events", outcome.rejected))  # type: ignore[return-value]
        return EventsResponse(
            accepted=outcome.accepted,
            duplicates=outcome.duplicates,
            rejected=[Rejected(index=r.record - 1, code=r.code, reason=r.reason) for r in outcome.rejected],
            users_updated=len(outcome.users_updated),
            unknown_items=outcome.unknown_items,
            unknown_actions=outcome.unknown_actions,
            model_version=recommender.version,
        )

    @bentoml.api(input_spec=REQUESTS.similar)
    def similar(self, item_id: str, k: int, ctx: bentoml.Context) -> SimilarResponse:
        """The k items most similar to an item (cosine of ALS item factors)."""
        too_long = _oversized(ctx, self.settings.events, [([], {"item_id": item_id})])
        if too_long is not None:
            return too_long  # type: ignore[return-value]
        live = self._live(ctx)
        if isinstance(live, JSONResponse):
            return live  # type: ignore[return-value]
        found = live.recommender.similar(item_id, k)
        if found is None:
            return _error(ctx, 404, f"item_id {item_id!r} is not in model {live.recommender.version}")  # type: ignore[return-value]
        return SimilarResponse(item_id=item_id, items=[ScoredItem(item_id=i, score=s) for i, s in found],
                               model_version=live.recommender.version)  # fmt: skip

    @bentoml.api(input_spec=REQUESTS.empty)
    def reload(self, ctx: bentoml.Context) -> ReloadResponse:
        """Switch to the production version now (the service also checks every service.reload_check_seconds)."""
        try:
            return self.reload_production()
        except RecflowError as exc:
            return _error(ctx, 503, f"cannot load the production version: {exc}")  # type: ignore[return-value]


NOT_DEPLOYED = "no model version is deployed: run `recflow deploy`"


@admin.get("/model", response_model=ModelResponse, responses={503: {"model": ErrorBody, "description": NOT_DEPLOYED}})
def model_info(service: Any = Depends(bentoml.get_current_service)) -> ModelResponse | JSONResponse:
    """The version being served: tag, when it was created and trained, its data version and offline metrics."""
    live = service.live
    if live is None:
        return JSONResponse({"error": NOT_DEPLOYED}, status_code=503)
    version = live.version
    return ModelResponse(
        version=version.version,
        tag=version.tag,
        created_at=version.created_at.isoformat(timespec="seconds"),
        trained_at=version.trained_at,
        data_version=version.data_version,
        metrics=version.metrics,
        model=version.model,
    )


def _config() -> ServiceSettings:
    """The running service's settings (params.yaml and the environment); the defaults before it has started."""
    try:
        config: ServiceSettings = bentoml.get_current_service().config
    except BentoMLException:
        return ServiceSettings()
    return config


def _write_access() -> WriteAccess:
    config = _config()
    return WriteAccess(token=config.token, protected=config.protected_mode)


def _readiness() -> tuple[bool, dict[str, str]]:
    try:
        service = bentoml.get_current_service()
    except BentoMLException:
        return False, {"service": "starting"}
    ready: tuple[bool, dict[str, str]] = service.readiness()
    return ready


Recommender.add_asgi_middleware(  # type: ignore[attr-defined]  # @bentoml.service made the class a Service
    RequestGuard,
    post_routes=POST_ROUTES,
    write_routes=WRITE_ROUTES,
    access=_write_access,
    limit=lambda: _config().max_body_bytes,
    readiness=_readiness,
)
use_cancelling_timeout(Recommender)  # BentoML's timeout is swapped in this service's app when it starts, nowhere else
trace_only_when_exported(Recommender)  # no OpenTelemetry middleware per request unless `tracing` exports the spans

# -- what each operation answers besides 200 (bentos/README.md, "Errors"); every error body is an ErrorBody ----------

BAD_REQUEST = Answer("the body breaks the request schema (detail: each problem's loc, msg, type)", ErrorBody)
BODY_ANSWERS = {
    400: BAD_REQUEST,
    413: Answer("the body is larger than service.max_body_bytes", ErrorBody),
    415: Answer("the content type is not application/json", ErrorBody),
    500: Answer("an unexpected error (a bug: see the service log)", ErrorBody),
    504: Answer("no answer within traffic.timeout", ErrorBody),
}
TOKEN_ANSWERS = {  # checked before the body is read, so they come before 400, 413, 415 and 422
    401: Answer(
        "no bearer token, when service.token (or RECFLOW_SERVICE_TOKEN) is set; with none set, a client not on "
        "loopback while service.protected_mode is true (the error says how to set a token or opt out)",
        ErrorBody,
    ),
    403: Answer("a wrong bearer token", ErrorBody),
}
TOO_LONG = "an id is longer than events.max_id_length (detail: each one, type id_too_long); the request is refused"
UNAVAILABLE = "no model version is deployed, or the user state or the event log is unreachable (retry is safe)"
document_answers(
    Recommender,
    {
        "POST /recommend": {
            **BODY_ANSWERS,
            422: Answer(f"{TOO_LONG}; or a recent event breaks a rule the schema cannot state (detail)", ErrorBody),
            503: Answer("no model version is deployed, or the user state is unreachable", ErrorBody),
        },
        "POST /events": {
            **BODY_ANSWERS,
            **TOKEN_ANSWERS,
            422: Answer(f"{TOO_LONG}; or no event was accepted: each breaks a rule the schema cannot state", ErrorBody),
            503: Answer(UNAVAILABLE, ErrorBody),
        },
        "POST /similar": {
            **BODY_ANSWERS,
            404: Answer("the model does not have this item", ErrorBody),
            422: Answer(TOO_LONG, ErrorBody),
            503: Answer(NOT_DEPLOYED, ErrorBody),
        },
        "POST /reload": {
            **BODY_ANSWERS,
            **TOKEN_ANSWERS,
            503: Answer("the production version cannot be loaded", ErrorBody),
        },
        "GET /readyz": {
            200: Answer("the model, the user state and the event log all work", Readiness),
            503: Answer("not ready: `checks` says what is wrong with each part", Readiness),
        },
    },
    bearer=("POST /events", "POST /reload") if CONFIG.token else (),
)
