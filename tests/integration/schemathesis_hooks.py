"""A schemathesis check for the HTTP service (loaded by schemathesis.toml at the repo root): a 422 must name only
rules a schema cannot state, or, for a request that breaks the schema, an id longer than events.max_id_length.

schemathesis.toml lets a request its schema accepts get 422 on POST /events and /recommend, the service's answer
when every event breaks a rule outside the schema (a timestamp after now + events.max_future_skew_seconds, or before
0001-01-02). This check keeps that allowance from hiding anything else: the 422's detail may name no other rule. The
spec states the id limit (maxLength), and the service refuses an id over it with 422 (`id_too_long`, issue 11): that
answer is right only for a request the schema forbids.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis import GenerationMode

UNSTATABLE = frozenset({"future_timestamp", "bad_timestamp"})  # the event contract's rejection codes
STATED_BUT_422 = frozenset({"id_too_long"})


@schemathesis.check
def unprocessable_names_only_unstatable_rules(ctx: Any, response: Any, case: Any) -> bool | None:
    if response.status_code != 422:
        return None
    negative = case.meta is not None and case.meta.generation.mode is GenerationMode.NEGATIVE
    allowed = UNSTATABLE | STATED_BUT_422 if negative else UNSTATABLE
    detail = response.json().get("detail") or []
    codes = {entry.get("type") for entry in detail}
    if not codes or not codes <= allowed:
        named = sorted(map(str, codes))
        raise AssertionError(f"422 names {named}, not only rules a schema cannot state ({sorted(allowed)})")
    return None
