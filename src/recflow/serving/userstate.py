"""The serving state of each user: the events received since training and the folded-in vectors.

Two stores behind one interface, chosen by params.yaml `service.redis_url`:

- `RedisUserState`: one Redis hash per user (`<prefix><user_id>`), so every worker and replica sees the same
  state. Field `e:<event_id>` holds an event as JSON (a replayed event overwrites itself: no duplicates);
  field `v:<model version>` holds the user's folded vector for that model version with the number of events
  it was computed from.
- `LocalUserState`: the same in memory, with every change appended to a JSON-lines log that is replayed (and
  compacted) when the service starts (one process; a torn last line from a crash is skipped with a warning).

Vectors are a cache keyed by model version: a vector computed from fewer events than the user now has, or for
another model version, is recomputed by the caller (serving.py) and stored again.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Protocol

import numpy as np

from recflow.errors import UserStateUnavailableError
from recflow.files import atomic_path
from recflow.stream.log import redact

logger = logging.getLogger(__name__)

_EVENT, _VECTOR = b"e:", b"v:"
_COUNT = struct.Struct("<q")  # events a stored vector was computed from, before the float32 vector


@dataclass(frozen=True)
class UserEvent:
    """One accepted event as the service keeps it."""

    event_id: str
    item_id: str
    action: str
    ts: int  # event time, epoch seconds (UTC)
    received_at: float  # when the service accepted it, epoch seconds


@dataclass(frozen=True)
class StoredVector:
    vector: np.ndarray  # float32
    n_events: int  # how many of the user's events it was folded from


class UserState(Protocol):
    def add_events(self, events: Mapping[str, Sequence[UserEvent]]) -> int:
        """Store events by user; returns how many were new (an event id already stored is a duplicate)."""
        ...

    def events(self, user_ids: Sequence[str]) -> dict[str, list[UserEvent]]:
        """Each user's stored events in time order (users without any are left out)."""
        ...

    def put_vectors(self, version: str, vectors: Mapping[str, StoredVector]) -> None: ...

    def vectors(self, version: str, user_ids: Sequence[str]) -> dict[str, StoredVector]: ...

    def ping(self) -> None:
        """Raise when the store cannot be reached."""
        ...

    def close(self) -> None: ...


def open_user_state(redis_url: str | None, prefix: str, path: Path) -> UserState:
    """Redis when a URL is configured, otherwise the local log at `path`."""
    if redis_url:
        return RedisUserState(redis_url, prefix)
    return LocalUserState(path)


def _sorted(events: Iterable[UserEvent]) -> list[UserEvent]:
    return sorted(events, key=lambda e: (e.ts, e.received_at, e.event_id))


def _vector_entry(user_id: str, version: str, stored: StoredVector) -> dict[str, object]:
    return {"user_id": user_id, "version": version, "n_events": stored.n_events, "vector": stored.vector.tolist()}


class LocalUserState:
    """In-memory state, durable through an append-only JSON-lines log (one process only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._events: dict[str, dict[str, UserEvent]] = {}
        self._vectors: dict[tuple[str, str], StoredVector] = {}
        self._lock = threading.Lock()
        self._replay()
        self._compact()
        self._log: IO[str] = path.open("a", encoding="utf-8")

    def _replay(self) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
                if "event" in entry:
                    event = UserEvent(**entry["event"])
                    self._events.setdefault(entry["user_id"], {})[event.event_id] = event
                else:
                    vector = StoredVector(np.asarray(entry["vector"], dtype=np.float32), int(entry["n_events"]))
                    self._vectors[(entry["version"], entry["user_id"])] = vector
            except (ValueError, KeyError, TypeError):
                logger.warning("%s line %d is not a state record (torn write?); skipped", self.path, number)
        logger.info("replayed %d users' state from %s", len(self._events), self.path)

    def _compact(self) -> None:
        """Rewrite the log atomically with one line per event and per current vector: superseded vectors and a
        torn last line are dropped, and appends start on a fresh line."""
        entries: list[dict[str, object]] = [
            {"user_id": u, "event": asdict(e)} for u, events in self._events.items() for e in events.values()
        ]
        entries += [_vector_entry(u, version, stored) for (version, u), stored in self._vectors.items()]
        with atomic_path(self.path) as tmp, tmp.open("w", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(entry, separators=(",", ":")) + "\n" for entry in entries))

    def _write(self, entries: list[dict[str, object]]) -> None:
        if entries:
            self._log.write("".join(json.dumps(entry, separators=(",", ":")) + "\n" for entry in entries))
            self._log.flush()

    def add_events(self, events: Mapping[str, Sequence[UserEvent]]) -> int:
        with self._lock:
            new: list[dict[str, object]] = []
            for user_id, user_events in events.items():
                stored = self._events.setdefault(user_id, {})
                for event in user_events:
                    if event.event_id not in stored:
                        stored[event.event_id] = event
                        new.append({"user_id": user_id, "event": asdict(event)})
            self._write(new)
            return len(new)

    def events(self, user_ids: Sequence[str]) -> dict[str, list[UserEvent]]:
        with self._lock:
            return {u: _sorted(self._events[u].values()) for u in user_ids if self._events.get(u)}

    def put_vectors(self, version: str, vectors: Mapping[str, StoredVector]) -> None:
        with self._lock:
            for user_id, stored in vectors.items():
                self._vectors[(version, user_id)] = stored
            self._write([_vector_entry(user_id, version, stored) for user_id, stored in vectors.items()])

    def vectors(self, version: str, user_ids: Sequence[str]) -> dict[str, StoredVector]:
        with self._lock:
            return {u: self._vectors[(version, u)] for u in user_ids if (version, u) in self._vectors}

    def ping(self) -> None:
        if self._log.closed:
            raise UserStateUnavailableError(f"the user state log {self.path} is closed")

    def close(self) -> None:
        with self._lock:
            self._log.close()


class RedisUserState:
    """State in Redis: one hash per user, shared by all workers and replicas."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis

        self.url = url
        self.prefix = prefix.encode()
        self.client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        import redis

        try:
            yield
        except redis.RedisError as exc:
            raise UserStateUnavailableError(
                f"the user state in Redis ({redact(self.url)}) cannot be reached: {exc}; start Redis or set "
                "service.redis_url (params.yaml) / RECFLOW_SERVICE_REDIS_URL to one that runs"
            ) from exc

    def _key(self, user_id: str) -> bytes:
        return self.prefix + user_id.encode()

    def add_events(self, events: Mapping[str, Sequence[UserEvent]]) -> int:
        pipe = self.client.pipeline(transaction=False)
        for user_id, user_events in events.items():
            for event in user_events:
                pipe.hsetnx(self._key(user_id), _EVENT + event.event_id.encode(), json.dumps(asdict(event)))
        with self._reaching():
            return sum(int(added) for added in pipe.execute())

    def _hashes(self, user_ids: Sequence[str]) -> list[dict[bytes, bytes]]:
        pipe = self.client.pipeline(transaction=False)
        for user_id in user_ids:
            pipe.hgetall(self._key(user_id))
        with self._reaching():
            return pipe.execute()

    def events(self, user_ids: Sequence[str]) -> dict[str, list[UserEvent]]:
        out: dict[str, list[UserEvent]] = {}
        for user_id, fields in zip(user_ids, self._hashes(user_ids), strict=True):
            events = [UserEvent(**json.loads(v)) for k, v in fields.items() if k.startswith(_EVENT)]
            if events:
                out[user_id] = _sorted(events)
        return out

    def put_vectors(self, version: str, vectors: Mapping[str, StoredVector]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for user_id, stored in vectors.items():
            value = _COUNT.pack(stored.n_events) + np.asarray(stored.vector, dtype="<f4").tobytes()
            pipe.hset(self._key(user_id), _VECTOR + version.encode(), value)
        with self._reaching():
            pipe.execute()

    def vectors(self, version: str, user_ids: Sequence[str]) -> dict[str, StoredVector]:
        pipe = self.client.pipeline(transaction=False)
        for user_id in user_ids:
            pipe.hget(self._key(user_id), _VECTOR + version.encode())
        with self._reaching():
            values = pipe.execute()
        out: dict[str, StoredVector] = {}
        for user_id, value in zip(user_ids, values, strict=True):
            if value is not None:
                (count,) = _COUNT.unpack_from(value)
                out[user_id] = StoredVector(np.frombuffer(value[_COUNT.size :], dtype="<f4").copy(), count)
        return out

    def ping(self) -> None:
        with self._reaching():
            self.client.ping()

    def close(self) -> None:
        self.client.close()
