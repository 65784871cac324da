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

import functools
import gc
import hmac
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import bentoml
from bentoml.exceptions import BentoMLException
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from recflow.config import ServiceSettings, Settings, load_settings
from recflow.errors import RecflowError, UserStateUnavailableError
from recflow.ops.registry import ModelVersion, load_production_bundle, production, production_file
from recflow.serving.bentoml_adapter import use_cancelling_timeout
from recflow.serving.httpguard import RequestGuard
from recflow.serving.online import OnlineRecommender
from recflow.serving.userstate import open_user_state
from recflow.stream.log import open_event_log

logger = logging.getLogger("recflow.service")

K_LIMIT = 200  # the API's largest k; params.yaml service.k_max may lower it
EVENTS_LIMIT = 10_000  # the schema's cap on events per request; params.yaml service.max_events may lower it
POST_ROUTES = ("/recommend", "/events", "/similar", "/reload")


def project_root() -> Path:
    """The project this service serves: RECFLOW_PROJECT, else the parent of the folder holding this file."""
    return Path(os.environ.get("RECFLOW_PROJECT") or Path(__file__).resolve().parent.parent).resolve()


def project_settings(root: Path) -> tuple[Settings, ServiceSettings]:
    """The project's settings (defaults without params.yaml) and the service's, with the environment's overrides."""
    params = root / "params.yaml"
    settings = load_settings(params) if params.exists() else Settings()
    return settings, settings.service.resolved(os.environ)


# -- request and response bodies ---------------------------------------------------------------------------

STRICT = ConfigDict(extra="forbid", strict=True)


class RecentEvent(BaseModel):
    """An event of the requesting user, used for this answer only (POST /events stores events)."""

    model_config = STRICT
    item_id: str | int
    action: str
    timestamp: str | int | float = Field(description="ISO-8601 with offset, or epoch seconds/milliseconds")
    event_id: str | int | None = None
    value: float | None = None


class Event(RecentEvent):
    """One event of the event contract (the rules are the event store's; see the project README)."""

    user_id: str | int


class RecommendRequest(BaseModel):
    model_config = STRICT
    user_id: str = Field(min_length=1, pattern=r"\S", description="a non-blank user id")
    k: int = Field(10, ge=1, le=K_LIMIT)
    exclude_seen: bool = True
    recent_events: list[RecentEvent] = Field(default_factory=list, max_length=EVENTS_LIMIT)


class EventsRequest(BaseModel):
    model_config = STRICT
    events: list[Event] = Field(min_length=1, max_length=EVENTS_LIMIT)


class SimilarRequest(BaseModel):
    model_config = STRICT
    item_id: str = Field(min_length=1, pattern=r"\S")
    k: int = Field(10, ge=1, le=K_LIMIT)


class EmptyRequest(BaseModel):
    model_config = STRICT


class ScoredItem(BaseModel):
    item_id: str
    score: float


class RecommendResponse(BaseModel):
    user_id: str
    items: list[ScoredItem]
    model_version: str
    strategy: Literal["personalized", "popular"]


class Rejected(BaseModel):
    index: int = Field(description="0-based position of the event in the request")
    code: str
    reason: str


class EventsResponse(BaseModel):
    accepted: int
    duplicates: int = Field(description="accepted events already received before (same event_id)")
    rejected: list[Rejected]
    users_updated: int
    unknown_items: list[str] = Field(description="stored, but unknown to the model: no effect until retraining")
    unknown_actions: list[str] = Field(description="stored, but not trained on: no effect until retraining")
    model_version: str


class SimilarResponse(BaseModel):
    item_id: str
    items: list[ScoredItem]
    model_version: str


class ModelResponse(BaseModel):
    version: str
    tag: str
    created_at: str
    trained_at: str
    data_version: str = Field(description='md5 of the data in data.dvc, or "untracked"')
    metrics: dict[str, float] = Field(description="offline metrics on the test window of its training")
    model: str = Field(description="the served kind: popularity, item_knn, ease, als or als_ranker (two-stage)")


class ReloadResponse(BaseModel):
    model_version: str | None
    previous: str | None
    changed: bool


# -- the service -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Live:
    """The model version being served; replaced as a whole (one attribute assignment) on reload."""

    recommender: OnlineRecommender
    version: ModelVersion


def _error(ctx: bentoml.Context, status: int, message: str, detail: Any = None) -> JSONResponse:
    ctx.response.status_code = status
    body: dict[str, Any] = {"error": message}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status)


def _freeze_heap() -> None:
    """Move the objects alive now (libraries, the loaded model) out of the garbage collector's reach. A full
    collection otherwise walks all of them (~300k objects, 120-160 ms with the GIL held) every few seconds under
    load, which was the whole p99 at 200 req/s. Reference counting still frees them."""
    gc.collect()
    gc.freeze()


admin = FastAPI(title="recflow admin", docs_url=None, redoc_url=None, openapi_url=None)
try:
    WORKERS = project_settings(project_root())[1].workers  # BentoML starts the workers before any of them runs
except RecflowError as exc:  # say what to fix in params.yaml, not where the import failed
    raise SystemExit(f"recflow: {exc}") from None


@bentoml.service(name="recflow", workers=WORKERS, traffic={"timeout": 30}, logging={"access": {"enabled": False}})
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
                bundle, version.tag, self.state, self.settings.events, trained_at=version.trained_at
            )
            self.live = Live(recommender, version)
            _freeze_heap()
            logger.info("serving %s (was %s)", version.tag, previous)
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

    def _authorized(self, ctx: bentoml.Context) -> JSONResponse | None:
        token = self.config.token
        if not token:
            return None
        header = ctx.request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return _error(ctx, 401, "missing bearer token: send `Authorization: Bearer <token>` (service.token)")
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            return _error(ctx, 403, "wrong bearer token")
        return None

    def _live(self, ctx: bentoml.Context) -> Live | JSONResponse:
        if self.live is None:
            return _error(ctx, 503, "no model version is deployed: run `recflow deploy`, then POST /reload")
        return self.live

    # -- endpoints --------------------------------------------------------------------------------------

    @bentoml.api(input_spec=RecommendRequest)
    async def recommend(
        self, user_id: str, k: int, exclude_seen: bool, recent_events: list[RecentEvent], ctx: bentoml.Context
    ) -> RecommendResponse:
        """Top-k items for a user: ALS candidates from the user's (folded-in) vector, reranked; items the user
        had are excluded unless exclude_seen is false. Unknown users without history get popular items."""
        live = self._live(ctx)
        if isinstance(live, JSONResponse):
            return live  # type: ignore[return-value]
        if k > self.config.k_max:
            return _error(ctx, 400, f"k must be at most {self.config.k_max} (service.k_max)", [{"loc": ["k"]}])
        if len(recent_events) > self.config.max_events:
            limit = self.config.max_events
            return _error(ctx, 413, f"recent_events: at most {limit} per request (service.max_events)")
        recent = []
        if recent_events:
            records = [event.model_dump(exclude_none=True) for event in recent_events]
            recent, rejected = live.recommender.validate_recent(user_id, records)
            if rejected:
                detail = [{"loc": ["recent_events", r.record - 1], "code": r.code, "msg": r.reason} for r in rejected]
                return _error(ctx, 400, f"{len(rejected)} invalid recent_events", detail)
        ask = functools.partial(live.recommender.recommend, user_id, k, exclude_seen=exclude_seen, recent=recent)
        try:
            # Scoring alone (~2 ms of numpy and LightGBM) runs on the event loop: a thread hop, and the GIL handed
            # back and forth, cost more than they save (p99 at 200 req/s 7.0 -> 4.4 ms). A Redis user state may
            # wait on the network, and the loop must not, so then it runs in a thread.
            answer = await run_in_threadpool(ask) if self.config.redis_url else ask()
        except UserStateUnavailableError as exc:
            return _error(ctx, 503, str(exc))
        items = [ScoredItem(item_id=i, score=s) for i, s in answer.items]
        return RecommendResponse(user_id=user_id, items=items, model_version=live.recommender.version,
                                 strategy=answer.strategy)  # fmt: skip

    @bentoml.api(input_spec=EventsRequest)
    def events(self, events: list[Event], ctx: bentoml.Context) -> EventsResponse:
        """Validate events with the event store's rules, append the accepted ones to the event log, and fold
        every affected user's vector in. 422 when no event was accepted."""
        denied = self._authorized(ctx)
        if denied is not None:
            return denied  # type: ignore[return-value]
        live = self._live(ctx)
        if isinstance(live, JSONResponse):
            return live  # type: ignore[return-value]
        if len(events) > self.config.max_events:
            return _error(ctx, 413, f"events: at most {self.config.max_events} per request (service.max_events)")
        recommender = live.recommender
        batch = recommender.validate_events([event.model_dump(exclude_none=True) for event in events])
        try:
            if batch.accepted.num_rows:  # logged first: what the service keeps, the next training sees
                accepted = [{k: v for k, v in row.items() if v is not None} for row in batch.accepted.to_pylist()]
                self.event_log.append(accepted)
            outcome = recommender.apply_events(batch)
        except RecflowError as exc:  # event log or user state unreachable: nothing was folded in
            return _error(ctx, 503, f"events not accepted, retry later: {exc}")
        if outcome.accepted == 0:
            ctx.response.status_code = 422
        return EventsResponse(
            accepted=outcome.accepted,
            duplicates=outcome.duplicates,
            rejected=[Rejected(index=r.record - 1, code=r.code, reason=r.reason) for r in outcome.rejected],
            users_updated=len(outcome.users_updated),
            unknown_items=outcome.unknown_items,
            unknown_actions=outcome.unknown_actions,
            model_version=recommender.version,
        )

    @bentoml.api(input_spec=SimilarRequest)
    def similar(self, item_id: str, k: int, ctx: bentoml.Context) -> SimilarResponse:
        """The k items most similar to an item (cosine of ALS item factors)."""
        live = self._live(ctx)
        if isinstance(live, JSONResponse):
            return live  # type: ignore[return-value]
        found = live.recommender.similar(item_id, min(k, self.config.k_max))
        if found is None:
            return _error(ctx, 404, f"item_id {item_id!r} is not in model {live.recommender.version}")  # type: ignore[return-value]
        return SimilarResponse(item_id=item_id, items=[ScoredItem(item_id=i, score=s) for i, s in found],
                               model_version=live.recommender.version)  # fmt: skip

    @bentoml.api(input_spec=EmptyRequest)
    def reload(self, ctx: bentoml.Context) -> ReloadResponse:
        """Switch to the production version now (the service also checks every service.reload_check_seconds)."""
        denied = self._authorized(ctx)
        if denied is not None:
            return denied  # type: ignore[return-value]
        try:
            return self.reload_production()
        except RecflowError as exc:
            return _error(ctx, 503, f"cannot load the production version: {exc}")  # type: ignore[return-value]


@admin.get("/model", response_model=ModelResponse, responses={503: {"description": "no version is deployed"}})
def model_info(service: Any = Depends(bentoml.get_current_service)) -> ModelResponse | JSONResponse:
    """The version being served: tag, when it was created and trained, its data version and offline metrics."""
    live = service.live
    if live is None:
        return JSONResponse({"error": "no model version is deployed: run `recflow deploy`"}, status_code=503)
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


def _body_limit() -> int:
    try:
        return bentoml.get_current_service().config.max_body_bytes
    except BentoMLException:  # not started yet: the default limit
        return ServiceSettings().max_body_bytes


def _readiness() -> tuple[bool, dict[str, str]]:
    try:
        service = bentoml.get_current_service()
    except BentoMLException:
        return False, {"service": "starting"}
    return service.readiness()


Recommender.add_asgi_middleware(RequestGuard, post_routes=POST_ROUTES, limit=_body_limit, readiness=_readiness)
use_cancelling_timeout(Recommender)  # BentoML's timeout is swapped in this service's app when it starts, nowhere else
