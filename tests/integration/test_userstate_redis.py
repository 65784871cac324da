"""The user state's pruning contract, over the real Redis on 127.0.0.1:6379 and over the local log alike."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from recflow.serving.userstate import LocalUserState, RedisUserState, StoredVector, UserEvent, UserState

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(params=["redis", "local"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[UserState]:
    if request.param == "local":
        local = LocalUserState(tmp_path / "state.jsonl")
        yield local
        local.close()
        return
    prefix = f"recflow-test:{uuid.uuid4().hex}:[*]?"  # glob characters in the prefix are taken literally
    store = RedisUserState(REDIS_URL, prefix)
    yield store
    store.close()
    client = redis.Redis.from_url(REDIS_URL)
    keys = [*client.scan_iter(match=f"recflow-test:{prefix.split(':')[1]}:*"), store.changes_key]
    if keys:
        client.delete(*keys)
    client.close()


def user_event(n: int) -> UserEvent:
    return UserEvent(f"e{n}", f"i{n}", "purchase", 1_790_000_000 + n, 1_800_000_000.0)


def vector(n: int) -> StoredVector:
    return StoredVector(np.full(4, n, dtype=np.float32), n)


def test_prune_drops_the_listed_events_and_other_versions_vectors_only(state: UserState) -> None:
    state.add_events({"a": [user_event(1), user_event(2)], "b": [user_event(3)], "c": [user_event(4)]})
    state.put_vectors("v1", {"a": vector(2), "b": vector(1)})
    state.put_vectors("v2", {"a": vector(1)})
    assert sorted(u for batch in state.users(batch=2) for u in batch) == ["a", "b", "c"]
    assert state.prune("v2", {"a": ["e1"], "b": ["e3"], "c": []}) == 2
    assert state.events(["a", "b", "c"]) == {"a": [user_event(2)], "c": [user_event(4)]}
    assert state.vectors("v1", ["a", "b"]) == {}
    assert state.vectors("v2", ["a"])["a"].n_events == 1
    assert sorted(u for batch in state.users() for u in batch) == ["a", "c"]  # b held nothing more: gone
    assert state.add_events({"a": [user_event(1)]}) == 1  # a pruned event sent again is stored again


def test_the_change_feed_names_the_users_with_new_events_since_a_cursor(state: UserState) -> None:
    """What the service's item statistics follow: each reader sees every user whose events were added since it
    last read, once per read, and the feed is not a user."""
    start = state.changes(None)[1]
    state.add_events({"a": [user_event(1), user_event(2)], "b": [user_event(3)]})
    users, cursor = state.changes(start)
    assert users == ["a", "b"]
    assert state.changes(cursor) == ([], cursor)
    state.add_events({"c": [user_event(4)], "a": [user_event(5)]})
    users, later = state.changes(cursor)
    assert users == ["c", "a"] and later != cursor
    assert sorted(u for batch in state.users() for u in batch) == ["a", "b", "c"]


def test_a_reader_behind_what_the_feed_keeps_is_told_to_read_everyone(state: UserState) -> None:
    start = state.changes(None)[1]
    state.add_events({"a": [user_event(1)]})
    if isinstance(state, RedisUserState):  # the stream trimmed past the reader
        state.add_events({"b": [user_event(2)]})
        state.client.xtrim(state.changes_key, maxlen=1, approximate=False)
        assert state.changes(start)[0] is None
    else:  # the local feed forgets what its one reader has passed
        state.changes(state.changes(start)[1])
        assert state.changes(start)[0] is None
