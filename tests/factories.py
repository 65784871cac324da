"""Builders for the events that many tests need: one raw record, a numbered run of records, a typed event table.

The defaults are one valid event; a test names only the fields it is about, so a reader sees what matters.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recflow.constants import ACTION, ITEM_ID, TIMESTAMP, USER_ID

ACTIONS = ("view", "click", "add_to_cart", "purchase")  # the shipped params.yaml's actions, weakest first
SECONDS_PER_DAY = 86_400
DAY0 = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp())  # day 0 of event_table, in seconds
EPOCH0 = 1_700_000_000  # second 0 of numbered_events (2023-11-14T22:13:20Z)


def event(**fields: Any) -> dict[str, Any]:
    """One valid raw event (u1 viewed i1 at 2024-05-01T12:00:00Z), changed by `fields`; a field set to `...` is
    left out, to test a missing field."""
    base: dict[str, Any] = {"user_id": "u1", "item_id": "i1", "action": "view", "timestamp": "2024-05-01T12:00:00Z"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def event_line(**fields: Any) -> str:
    """`event(**fields)` as one JSON line (without the newline)."""
    return json.dumps(event(**fields))


def numbered_events(
    n: int, start: int = 0, *, users: int = 50, items: int = 7, action: str = "view", per_second: int = 1
) -> list[dict[str, object]]:
    """Events number `start` to `start + n - 1`: event i is user u{i % users} on item i{i % items}, at second
    EPOCH0 + i // per_second, with event_id e{i}; so a test can name exactly which events it expects back."""
    return [
        {
            "user_id": f"u{i % users}",
            "item_id": f"i{i % items}",
            "action": action,
            "timestamp": EPOCH0 + i // per_second,
            "event_id": f"e{i}",
        }
        for i in range(start, start + n)
    ]


def event_table(rows: Sequence[tuple[str, str, str, float]]) -> pa.Table:
    """(user, item, action, day) rows as an event table with millisecond UTC timestamps; day counts days
    (fractions allowed) after DAY0 (2024-01-01)."""
    users, items, actions, days = zip(*rows, strict=True)
    stamps = [int((DAY0 + d * SECONDS_PER_DAY) * 1000) for d in days]
    return pa.table(
        {
            "user_id": list(users),
            "item_id": list(items),
            "action": list(actions),
            "timestamp": pa.array(stamps, pa.timestamp("ms", tz="UTC")),
        }
    )


def drift_frame(table: pa.Table) -> pd.DataFrame:
    """An event table as the drift check reads it (recflow.ops.drift.load_events): user_id, item_id and action as
    categories, ts as int64 milliseconds."""
    return pd.DataFrame(
        {
            USER_ID: table[USER_ID].to_pandas().astype("category"),
            ITEM_ID: table[ITEM_ID].to_pandas().astype("category"),
            ACTION: table[ACTION].to_pandas().astype("category"),
            "ts": pc.cast(table[TIMESTAMP], "int64").to_numpy(),
        }
    )
