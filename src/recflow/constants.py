"""Column names of the event contract, defined once and used as keyword defaults everywhere."""

from __future__ import annotations

EVENT_ID = "event_id"
USER_ID = "user_id"
ITEM_ID = "item_id"
ACTION = "action"
TIMESTAMP = "timestamp"
VALUE = "value"

EVENT_COLUMNS = (EVENT_ID, USER_ID, ITEM_ID, ACTION, TIMESTAMP, VALUE)
REQUIRED_COLUMNS = (USER_ID, ITEM_ID, ACTION, TIMESTAMP)

# Integer codes used after features have mapped ids to matrix rows and columns.
USER_IDX = "user_idx"
ITEM_IDX = "item_idx"
