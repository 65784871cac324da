"""The bodies of the HTTP service (bentos/service.py): requests, answers, and the one error shape.

The request schemas carry the event contract's rules (`recflow.events.contract`) wherever a JSON schema can state
them, with the limits of the project's params.yaml: the actions (`events.actions`), non-blank ids of at most
`events.max_id_length` characters, RFC 3339 date-times with an offset or epoch numbers, `k` up to `service.k_max`,
at most `service.max_events` events per request. The service validates a request against exactly these models, so
a request its OpenAPI spec accepts is one the service accepts, and one the spec forbids gets 400 as a whole, but for
an id longer than `events.max_id_length`: the spec states the limit (maxLength), the models leave it to the service,
which refuses the request whole with 422 and the event contract's `id_too_long` (every endpoint alike). What a
schema cannot state (a timestamp too far in the future, an item the model does not know) the descriptions name;
the service answers those per event (`rejected`, `unknown_items`) and with 422 when nothing is left.

Every 4xx and 5xx body, BentoML's validation errors included, is an `ErrorBody`: `{"error": ..., "detail": [{"loc",
"msg", "type"}]}`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    WithJsonSchema,
    create_model,
)

from recflow.config import EventSettings, ServiceSettings
from recflow.events.parse import MAX_MS

__all__ = [
    "NOT_BLANK",
    "ErrorBody",
    "ErrorDetail",
    "EventsResponse",
    "ModelResponse",
    "Readiness",
    "RecommendResponse",
    "Rejected",
    "ReloadResponse",
    "RequestModels",
    "ScoredItem",
    "SimilarResponse",
    "request_models",
]

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
# One character that no definition of whitespace counts: Python's and pyarrow's (the contract's `empty_id`), Unicode's
# White_Space (pydantic's regex engine), ECMAScript's \s (OpenAPI's patterns, which add U+FEFF). An id with one is not
# blank by any of them, so the spec, pydantic and the event store agree.
NOT_BLANK = r"[^\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
INT64 = 2**63 - 1
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})", re.ASCII
)
_NOT_BLANK = re.compile(NOT_BLANK)
_DATE_TIME_PROBLEM = "must be an RFC 3339 date-time with an offset (2026-11-24T09:00:00Z, 2026-11-24T11:00:00+02:00)"


def _date_time(text: str) -> str:
    """An RFC 3339 date-time (JSON Schema's `date-time`) in the form the event contract reads (T and Z upper case)."""
    canonical = text.upper()
    if _RFC3339.fullmatch(text) is None:
        raise ValueError(_DATE_TIME_PROBLEM)
    try:
        datetime.fromisoformat(canonical)
    except ValueError as exc:  # 2026-02-30, 25:00, a leap second
        raise ValueError(f"{_DATE_TIME_PROBLEM}: {exc}") from None
    return canonical


def _not_blank(text: str) -> str:
    if _NOT_BLANK.search(text) is None:
        raise ValueError("is empty or blank; give a non-empty id")
    return text


def _by_type(value: Any) -> str:
    """Which member of a text-or-number union a JSON value is for (pydantic then reports that member's error only)."""
    return "text" if isinstance(value, str) else "number"


def _text_or_number(text: Any, number: Any) -> Any:
    return Annotated[Annotated[text, Tag("text")] | Annotated[number, Tag("number")], Discriminator(_by_type)]


TIMESTAMP = _text_or_number(
    Annotated[str, AfterValidator(_date_time), WithJsonSchema({"type": "string", "format": "date-time"})],
    Annotated[float, Field(ge=0, le=MAX_MS)],
)
VALUE = Annotated[float, Field(description="a finite number (rating, quantity, seconds)")]
TIMESTAMP_RULES = (
    "RFC 3339 with an offset, or epoch seconds (milliseconds above 1e11). Not stated by the schema: the instant must "
    "lie between 0001-01-02 and events.max_future_skew_seconds after the event arrives; an event outside is listed "
    "in `rejected` (code future_timestamp or bad_timestamp)."
)


def _ids(limit: int) -> tuple[Any, Any, Any]:
    """A non-blank id of at most `limit` characters: as text, and as text or an integer (int64) of at most `limit`
    characters. The text's maxLength is stated, not enforced: the service answers a longer id with 422."""
    text = Annotated[
        str,
        StringConstraints(min_length=1),
        AfterValidator(_not_blank),
        Field(json_schema_extra={"pattern": NOT_BLANK, "maxLength": limit}),
    ]
    number = Annotated[int, Field(ge=max(-INT64 - 1, -(10 ** (limit - 1) - 1)), le=min(INT64, 10**limit - 1))]
    return text, number, _text_or_number(text, number)


@dataclass(frozen=True)
class RequestModels:
    """The request bodies of one configuration (see `request_models`)."""

    recent_event: type[BaseModel]
    event: type[BaseModel]
    recommend: type[BaseModel]
    events: type[BaseModel]
    similar: type[BaseModel]
    empty: type[BaseModel]


def request_models(events: EventSettings, service: ServiceSettings) -> RequestModels:
    """The request bodies with the limits of these settings (params.yaml `events:` and `service:`)."""
    text_id, number_id, any_id = _ids(events.max_id_length)
    actions = tuple(events.actions)
    action = Literal[actions]  # type: ignore[valid-type]
    item_rule = "an item the model does not know is stored and listed in `unknown_items` (no effect until retraining)"
    recent_event = create_model(
        "RecentEvent",
        __config__=STRICT,
        __doc__="An event of the requesting user, used for this answer only (POST /events stores events).",
        item_id=(any_id, Field(description=f"Not stated by the schema: {item_rule}.")),
        action=(action, Field(description=f"one of events.actions in params.yaml: {', '.join(actions)}")),
        timestamp=(TIMESTAMP, Field(description=TIMESTAMP_RULES)),
        event_id=(
            _text_or_number(Literal[""] | text_id, number_id) | None,  # type: ignore[maybe-unrecognized-str-typeform]
            Field(None, description="derived from the event when absent or empty"),
        ),
        value=(VALUE | None, None),
    )
    event = create_model(
        "Event",
        __base__=recent_event,
        __doc__="One event of the event contract (the event store's rules; see the project README).",
        user_id=(any_id, ...),
    )
    k = Annotated[int, Field(ge=1, le=service.k_max, description="how many items (service.k_max at most)")]
    at_most = f"at most service.max_events ({service.max_events})"
    recommend = create_model(
        "RecommendRequest",
        __config__=STRICT,
        user_id=(text_id, Field(description="a user id; an unknown user gets the popular items")),
        k=(k, 10),
        exclude_seen=(bool, True),
        recent_events=(
            list[recent_event],  # type: ignore[valid-type]
            Field(default_factory=list, max_length=service.max_events, description=f"{at_most}; not stored"),
        ),
    )
    events_request = create_model(
        "EventsRequest",
        __config__=STRICT,
        events=(list[event], Field(min_length=1, max_length=service.max_events, description=at_most)),  # type: ignore[valid-type]
    )
    similar = create_model(
        "SimilarRequest",
        __config__=STRICT,
        item_id=(text_id, Field(description="Not stated by the schema: an item the model does not have gets 404.")),
        k=(k, 10),
    )
    empty = create_model("EmptyRequest", __config__=STRICT)
    return RequestModels(recent_event, event, recommend, events_request, similar, empty)


# -- answers ---------------------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    loc: list[str | int] = Field(description="where in the request body: field names and list positions")
    msg: str = Field(description="what is wrong there")
    type: str = Field(description="pydantic's error type, or the event contract's rejection code")
    url: str | None = Field(None, description="pydantic's page about the error type")


class ErrorBody(BaseModel):
    """The body of every 4xx and 5xx answer."""

    error: str = Field(description="what was wrong and how to fix it")
    detail: list[ErrorDetail] = Field(default_factory=list, description="one entry per problem, when there are several")


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, str] = Field(description='each part ("model", "user_state", "event_log"): "ok" or what is wrong')


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
    code: str = Field(description="the event contract's rejection code (future_timestamp, bad_timestamp)")
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
