"""The serving state of each user: the events the served model was not trained on, and the folded-in vectors.

Two stores behind one interface, chosen by params.yaml `service.redis_url`:

- `RedisUserState`: one Redis hash per user (`<prefix><user_id>`), so every worker and replica sees the same
  state. Field `e:<event_id>` holds an event as JSON (a replayed event overwrites itself: no duplicates);
  field `v:<model version>` holds the user's folded vector for that model version with the number of events
  it was computed from. A hash whose last field is pruned is gone (Redis deletes empty hashes).
- `LocalUserState`: the same in memory, with every change appended to a JSON-lines log that is replayed when
  the service starts (one process; a torn last line from a crash is skipped with a warning), line by line. The
  log is compacted (rewritten atomically with one line per live event and vector) at start when it holds any
  dead line, and while running whenever its dead lines (superseded vectors, pruned events, prune records)
  outnumber the live ones `compact_ratio` times over and are at least `compact_min_dead`: the file stays within
  a constant factor of the state, at an amortised constant cost per write.

Both also keep a feed of the users whose events were added (`changes`): the service's item statistics
(serving/online.py) read it to follow the events every worker receives. Redis keeps it in a stream beside the
hashes (NUL + `changes:<prefix>`, outside the prefix, trimmed to about `CHANGES_KEPT` entries), the local state
in memory (without the log's replay: a reader starts from a scan of `users`).

Vectors are a cache keyed by model version: a vector computed from fewer events than the user now has for that
version, or for another model version, is recomputed by the caller (serving/online.py) and stored again.

The state stays bounded: once a new model version is served, the events it was trained on are pruned
(`prune`: by online.py on reload and when it reads a user) together with the vectors of other versions, so the
state holds what the served model has not seen, not everything since the service first started.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import sys
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import numpy as np

from recflow.errors import UserStateUnavailableError
from recflow.files import atomic_path
from recflow.stream.log import redact

logger = logging.getLogger(__name__)

_EVENT, _VECTOR = b"e:", b"v:"
CHANGES_KEPT = 100_000  # entries of the Redis change feed kept; a reader further behind reads every user again
_COUNT = struct.Struct("<q")  # events a stored vector was computed from, before the float32 vector


@dataclass(frozen=True, slots=True)
class UserEvent:
    """One accepted event as the service keeps it (a million of them in memory: slots, and the item and action
    strings interned by whoever builds them, `UserEvent.of`)."""

    event_id: str
    item_id: str
    action: str
    ts: int  # event time, epoch seconds (UTC)
    received_at: float  # when the service accepted it, epoch seconds

    @classmethod
    def of(cls, event_id: str, item_id: str, action: str, ts: int, received_at: float) -> UserEvent:
        """An event whose item and action strings are shared with every other event of that item and action."""
        return cls(event_id, sys.intern(item_id), sys.intern(action), ts, received_at)

    def record(self) -> dict[str, object]:
        """The fields by name, as stored (`UserEvent.of(**record)` reads it back); `dataclasses.asdict` deep-copies
        every field, which was most of the cost of rewriting a log of a million events."""
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True)
class StoredVector:
    vector: np.ndarray  # float32
    n_events: int  # how many of the user's events it was folded from (those the model version can use)


class UserState(Protocol):
    def add_events(self, events: Mapping[str, Sequence[UserEvent]]) -> int:
        """Store events by user; returns how many were new (an event id already stored is a duplicate)."""
        ...

    def events(self, user_ids: Sequence[str]) -> dict[str, list[UserEvent]]:
        """Each user's stored events in time order (users without any are left out)."""
        ...

    def put_vectors(self, version: str, vectors: Mapping[str, StoredVector]) -> None: ...

    def vectors(self, version: str, user_ids: Sequence[str]) -> dict[str, StoredVector]: ...

    def users(self, batch: int = 1000) -> Iterator[list[str]]:
        """Every user with stored events or vectors, in batches of at most `batch` ids."""
        ...

    def prune(self, version: str, events: Mapping[str, Collection[str]]) -> int:
        """For each user given: drop the listed events (model `version` was trained on them) and the vectors of
        every other version (only `version` is served from now on). Returns how many events were dropped."""
        ...

    def changes(self, cursor: str | None) -> tuple[list[str] | None, str]:
        """The users whose events were added since `cursor` (each once) and the cursor to pass next. `None` as
        the cursor: the feed's end, with no users. `None` as the users: the feed no longer holds everything
        since the cursor (the reader fell behind), so every user may have changed. One reader per process (the
        local feed forgets what its reader has passed)."""
        ...

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


def _line(entry: Mapping[str, object]) -> str:
    return json.dumps(entry, separators=(",", ":")) + "\n"


class LocalUserState:
    """In-memory state, durable through an append-only JSON-lines log (one process only), compacted while running.

    Log lines: `{"user_id", "event"}` (an event), `{"user_id", "version", "n_events", "vector"}` (a vector, which
    supersedes the user's earlier one of that version), `{"user_id", "pruned", "version"}` (a `prune`)."""

    def __init__(self, path: Path, *, compact_ratio: float = 1.0, compact_min_dead: int = 10_000) -> None:
        self.path = path
        self.compact_ratio = compact_ratio
        self.compact_min_dead = compact_min_dead
        self._events: dict[str, dict[str, UserEvent]] = {}
        self._vectors: dict[str, dict[str, StoredVector]] = {}  # user -> model version -> vector
        self._changed: list[str] = []  # users with new events, in order; _changed[0] is change number _passed
        self._passed = 0
        self._live = 0  # events and vectors held: the lines a compacted log has
        self._lines = 0  # lines in the log
        self._lock = threading.Lock()
        clean = self._replay()
        self._log: IO[str] = self.path.open("a", encoding="utf-8") if clean else self._compact()

    def _replay(self) -> bool:
        """Load the log; True when it has no dead line and ends with a newline (nothing to compact)."""
        if not self.path.exists():
            return False
        last = "\n"
        with self.path.open(encoding="utf-8") as log:  # line by line: the file is not held in memory at once
            for number, line in enumerate(log, start=1):
                self._apply(line, number)
                self._lines, last = number, line
        logger.info("replayed %d users' state from %s", len(self._events), self.path)
        return self._lines == self._live and last.endswith("\n")

    def _apply(self, line: str, number: int) -> None:
        try:
            entry = json.loads(line)
            user_id = entry["user_id"]
            if "event" in entry:
                self._add(user_id, UserEvent.of(**entry["event"]))
            elif "pruned" in entry:
                self._prune(user_id, entry["version"], entry["pruned"])
            else:
                vector = StoredVector(np.asarray(entry["vector"], dtype=np.float32), int(entry["n_events"]))
                self._put(user_id, entry["version"], vector)
        except (ValueError, KeyError, TypeError):
            logger.warning("%s line %d is not a state record (torn write?); skipped", self.path, number)

    # in-memory changes (the caller holds the lock, or is the constructor); each keeps the live count

    def _add(self, user_id: str, event: UserEvent) -> bool:
        stored = self._events.setdefault(user_id, {})
        if event.event_id in stored:
            return False
        stored[event.event_id] = event
        self._live += 1
        return True

    def _put(self, user_id: str, version: str, vector: StoredVector) -> None:
        versions = self._vectors.setdefault(user_id, {})
        self._live += version not in versions
        versions[version] = vector

    def _prune(self, user_id: str, version: str, event_ids: Iterable[str]) -> int:
        events = self._events.get(user_id, {})
        dropped = sum(events.pop(event_id, None) is not None for event_id in event_ids)
        versions = self._vectors.get(user_id, {})
        stale = [v for v in versions if v != version]
        for v in stale:
            del versions[v]
        for table in (self._events, self._vectors):
            if not table.get(user_id):
                table.pop(user_id, None)
        self._live -= dropped + len(stale)
        return dropped

    # the log

    def _compact(self) -> IO[str]:
        """Rewrite the log atomically with one line per event and per current vector (superseded vectors, pruned
        events, prune records and a torn last line are dropped), and open it for appending."""
        with atomic_path(self.path) as tmp, tmp.open("w", encoding="utf-8") as fh:
            for user_id, events in self._events.items():
                fh.writelines(_line({"user_id": user_id, "event": e.record()}) for e in events.values())
            for user_id, versions in self._vectors.items():
                fh.writelines(_line(_vector_entry(user_id, v, stored)) for v, stored in versions.items())
        self._lines = self._live
        return self.path.open("a", encoding="utf-8")

    def _write(self, entries: list[dict[str, object]]) -> None:
        if not entries:
            return
        self._log.write("".join(_line(entry) for entry in entries))
        self._log.flush()
        self._lines += len(entries)
        dead = self._lines - self._live
        if dead >= self.compact_min_dead and dead > self.compact_ratio * self._live:
            compacted = self._compact()  # on error the old log stays whole, and open
            self._log.close()
            self._log = compacted
            logger.info("compacted %s: %d dead lines dropped, %d kept", self.path, dead, self._live)

    def add_events(self, events: Mapping[str, Sequence[UserEvent]]) -> int:
        with self._lock:
            new: list[dict[str, object]] = []
            for user_id, user_events in events.items():
                for event in user_events:
                    if self._add(user_id, event):
                        new.append({"user_id": user_id, "event": event.record()})
                if new and new[-1]["user_id"] == user_id:
                    self._changed.append(user_id)
            self._write(new)
            return len(new)

    def changes(self, cursor: str | None) -> tuple[list[str] | None, str]:
        with self._lock:
            end = self._passed + len(self._changed)
            if cursor is None:
                return [], str(end)
            position = int(cursor)
            if position < self._passed:
                return None, str(end)
            del self._changed[: position - self._passed]  # the reader has passed them
            self._passed = position
            return list(dict.fromkeys(self._changed)), str(end)

    def events(self, user_ids: Sequence[str]) -> dict[str, list[UserEvent]]:
        with self._lock:
            return {u: _sorted(self._events[u].values()) for u in user_ids if self._events.get(u)}

    def put_vectors(self, version: str, vectors: Mapping[str, StoredVector]) -> None:
        with self._lock:
            for user_id, stored in vectors.items():
                self._put(user_id, version, stored)
            self._write([_vector_entry(user_id, version, stored) for user_id, stored in vectors.items()])

    def vectors(self, version: str, user_ids: Sequence[str]) -> dict[str, StoredVector]:
        with self._lock:
            found = ((u, self._vectors.get(u, {}).get(version)) for u in user_ids)
            return {u: stored for u, stored in found if stored is not None}

    def users(self, batch: int = 1000) -> Iterator[list[str]]:
        with self._lock:
            user_ids = list(self._events.keys() | self._vectors.keys())
        for start in range(0, len(user_ids), batch):
            yield user_ids[start : start + batch]

    def prune(self, version: str, events: Mapping[str, Collection[str]]) -> int:
        with self._lock:
            dropped = 0
            entries: list[dict[str, object]] = []
            for user_id, event_ids in events.items():
                stale = any(v != version for v in self._vectors.get(user_id, {}))
                if not (stale or any(e in self._events.get(user_id, {}) for e in event_ids)):
                    continue  # nothing of this user to drop: no record
                dropped += self._prune(user_id, version, event_ids)
                entries.append({"user_id": user_id, "pruned": sorted(event_ids), "version": version})
            self._write(entries)
            return dropped

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
        self.changes_key = b"\x00changes:" + self.prefix  # outside the prefix: not a user's hash
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
                pipe.hsetnx(self._key(user_id), _EVENT + event.event_id.encode(), json.dumps(event.record()))
        for user_id, user_events in events.items():  # a replayed event announces its user again: harmless
            if user_events:
                pipe.xadd(self.changes_key, {b"u": user_id.encode()}, maxlen=CHANGES_KEPT, approximate=True)
        with self._reaching():
            results = pipe.execute()
        return sum(int(added) for added in results[: sum(len(e) for e in events.values())])

    def changes(self, cursor: str | None) -> tuple[list[str] | None, str]:
        # the cursor is "<last entry id read>/<entries ever added by then>": fewer entries after that id than were
        # added since means the stream was trimmed past the reader
        import redis

        last, _, added = (cursor or "0-0/0").partition("/")
        pipe = self.client.pipeline(transaction=True)  # one moment for the count and the entries
        pipe.xinfo_stream(self.changes_key)
        if cursor is not None:
            pipe.xrange(self.changes_key, min=f"({last}")
        with self._reaching():
            info, *read = pipe.execute(raise_on_error=False)
        total = 0 if isinstance(info, redis.ResponseError) else int(info["entries-added"])  # no stream: none yet
        if cursor is None:
            return [], f"{info['last-generated-id'].decode()}/{total}" if total else "0-0/0"
        entries = read[0]
        if isinstance(entries, redis.RedisError):
            with self._reaching():
                raise entries
        following = f"{entries[-1][0].decode() if entries else last}/{total}"
        if int(added) + len(entries) < total:
            return None, following
        return list(dict.fromkeys(fields[b"u"].decode() for _, fields in entries)), following

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

    def users(self, batch: int = 1000) -> Iterator[list[str]]:
        pattern = re.sub(rb"([*?\[\]\\])", rb"\\\1", self.prefix) + b"*"  # the prefix taken literally
        found: list[str] = []
        with self._reaching():
            for key in self.client.scan_iter(match=pattern, count=batch):
                found.append(key[len(self.prefix) :].decode())
                if len(found) == batch:
                    yield found
                    found = []
        if found:
            yield found

    def prune(self, version: str, events: Mapping[str, Collection[str]]) -> int:
        user_ids = list(events)
        pipe = self.client.pipeline(transaction=False)
        for user_id in user_ids:
            pipe.hkeys(self._key(user_id))
        with self._reaching():
            fields_by_user = pipe.execute()
        keep = _VECTOR + version.encode()
        dropped = 0
        for user_id, fields in zip(user_ids, fields_by_user, strict=True):
            listed = {_EVENT + event_id.encode() for event_id in events[user_id]}
            drop = [f for f in fields if f in listed or (f.startswith(_VECTOR) and f != keep)]
            if drop:
                pipe.hdel(self._key(user_id), *drop)
                dropped += sum(f.startswith(_EVENT) for f in drop)
        with self._reaching():
            pipe.execute()
        return dropped

    def ping(self) -> None:
        with self._reaching():
            self.client.ping()

    def close(self) -> None:
        self.client.close()
