"""LocalUserState: pruning and compaction while running keep the log's replay identical to the state in memory.

The same contract over Redis is in tests/integration/test_userstate_redis.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recflow.serving.userstate import LocalUserState, StoredVector, UserEvent


def user_event(n: int) -> UserEvent:
    return UserEvent(f"e{n}", f"i{n % 7}", "view", 1_790_000_000 + n, 1_800_000_000.0 + n)


def vector(seed: int) -> StoredVector:
    return StoredVector(np.random.default_rng(seed).random(4, dtype=np.float32), seed)


def snapshot(state: LocalUserState, versions: tuple[str, ...]) -> tuple[object, ...]:
    """Everything a reader of the state can see, comparable across instances."""
    users = sorted(u for batch in state.users() for u in batch)
    events = state.events(users)
    vectors = {v: {u: (s.n_events, s.vector.tolist()) for u, s in state.vectors(v, users).items()} for v in versions}
    return users, events, vectors


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_pruned_events_and_other_versions_vectors_are_gone_and_stay_gone_after_a_restart(tmp_path: Path) -> None:
    state = LocalUserState(tmp_path / "state.jsonl")
    state.add_events({"a": [user_event(1), user_event(2), user_event(3)], "b": [user_event(4)]})
    state.put_vectors("v1", {"a": vector(1), "b": vector(2)})
    state.put_vectors("v2", {"a": vector(3)})
    assert state.prune("v2", {"a": ["e1", "e2", "not-stored"], "b": ["e4"]}) == 3
    assert state.events(["a", "b"]) == {"a": [user_event(3)]}
    assert state.vectors("v1", ["a", "b"]) == {}  # only the served version's vectors are kept
    assert list(state.vectors("v2", ["a"])) == ["a"]
    assert sorted(u for batch in state.users() for u in batch) == ["a"]  # b held nothing more: gone
    before = snapshot(state, ("v1", "v2"))
    state.close()
    restarted = LocalUserState(tmp_path / "state.jsonl")
    assert snapshot(restarted, ("v1", "v2")) == before
    assert lines(tmp_path / "state.jsonl") == 2  # compacted at start: one event and one vector
    restarted.close()


def test_the_log_is_compacted_while_running_and_replays_to_the_same_state(tmp_path: Path) -> None:
    path = tmp_path / "state.jsonl"
    state = LocalUserState(path, compact_ratio=1.0, compact_min_dead=20)
    users = [f"u{n}" for n in range(5)]
    for step in range(60):  # every fold rewrites a vector: the superseded lines are dead
        state.add_events({users[step % 5]: [user_event(step)]})
        state.put_vectors("v1", {u: vector(step) for u in users})
        if step == 30:
            state.prune("v2", {u: [f"e{n}" for n in range(20)] for u in users})
        state.put_vectors("v2", {users[step % 5]: vector(step)})
        live = sum(len(e) for e in state.events(users).values()) + 5 + len(state.vectors("v2", users))
        # never more dead lines than live ones (+ what one write adds) once past the minimum
        assert lines(path) <= max(2 * live, live + 20) + 6
    expected = snapshot(state, ("v1", "v2"))
    assert state.events(["u0"])["u0"][0] == user_event(20)  # the prune took effect
    state.close()
    restarted = LocalUserState(path)
    assert snapshot(restarted, ("v1", "v2")) == expected
    restarted.close()


def test_a_compaction_that_fails_leaves_the_log_whole_and_appending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.jsonl"
    state = LocalUserState(path, compact_ratio=0.0, compact_min_dead=1)  # compact at the first dead line
    state.add_events({"a": [user_event(1)]})
    state.put_vectors("v1", {"a": vector(1)})
    before = path.read_text()
    with monkeypatch.context() as patch:
        patch.setattr(state, "_compact", lambda: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError, match="disk full"):
            state.put_vectors("v1", {"a": vector(2)})  # one dead line: compaction is due, and fails
    assert path.read_text().startswith(before) and lines(path) == 3  # appended, nothing lost
    state.add_events({"a": [user_event(2)]})  # still appending (and compacted now)
    assert lines(path) == 3  # two events and one vector
    expected = snapshot(state, ("v1",))
    state.close()
    restarted = LocalUserState(path)
    assert snapshot(restarted, ("v1",)) == expected
    restarted.close()
