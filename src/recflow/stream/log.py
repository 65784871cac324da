"""The event log: where raw events wait between the producers (`POST /events`, `recflow publish`) and the
consumer that stores them (`recflow.stream.consumer.drain`). One contract, two implementations:

- `RedisStreamLog` (production; chosen when `eventlog.redis_url` or RECFLOW_REDIS_URL is set): one stream
  entry per event, `XADD <stream> * event <JSON>`, 2,000 XADDs to a Lua script call (atomic per call), the
  calls pipelined. Read with a consumer group (XREADGROUP), pending entries of a dead consumer taken over
  with XAUTOCLAIM, XACK after the store write, poison entries moved to a dead-letter stream (XADD + XACK in
  one MULTI). Durable as the server is configured: `appendonly yes` with `appendfsync always` (or
  `everysec`, which may lose the last second on a power cut).
- `recflow.stream.spool.SpoolLog` (embedded default): an append-only file `<spool>/events.jsonl`, one JSON line
  per event, appended under an exclusive flock and fsync'd before `append` returns. One consumer at a
  time; its position survives restarts; dead letters go to `dead-letter.jsonl` beside it.

Delivery is at least once: an entry is acknowledged only after the consumer stored it, so a crash
re-delivers it, and the store's dedup by event_id makes each event stored exactly once. `Entry.deliveries`
counts deliveries across restarts (Redis: the PEL's delivery counter; spool: persisted with the position),
so that an entry that keeps killing its consumer can be dead-lettered after a bounded number of attempts.

Trimming never drops an entry that some consumer group has not read and acknowledged. Redis 7's
`XADD MAXLEN` cannot know that (the ACKED trim option came with Redis 8.2), so `append` does not trim;
after each acknowledgement the consumer runs one Lua script (atomic) that, when the stream is longer than
`eventlog.maxlen`, trims with `XTRIM MINID ~ <bound>`, where bound is the smallest over all groups of the
group's oldest pending entry (or, with nothing pending, its last-delivered id). Every entry below the bound
was delivered to and acknowledged by every group. A stream without any group is never trimmed, and a
lagging group lets the stream grow past maxlen rather than lose events: watch the reported lag. The spool
is truncated only when its consumer has acknowledged every line of it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.compute as pc
import redis
from redis.typing import EncodableT, FieldT, StreamIdT

from recflow.config import EventLogSettings
from recflow.errors import EventLogUnavailableError
from recflow.events.contract import RAW_COLUMN, RECORD_COLUMN, Rejection
from recflow.events.fileio import read_event_file

logger = logging.getLogger(__name__)

FIELD = "event"  # the stream entry field that holds the JSON record
_FIELD = FIELD.encode()
_SCRIPT_CHUNK = 2_000  # XADDs per script call (atomic; keeps Redis busy for a few ms at most)
_ADD = f"for i = 1, #ARGV do redis.call('XADD', KEYS[1], '*', '{FIELD}', ARGV[i]) end return #ARGV"
_TRIM = """
if redis.call('XLEN', KEYS[1]) <= tonumber(ARGV[1]) then return 0 end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return 0 end
local bound, bms, bseq
for _, group in ipairs(groups) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  local id = info['last-delivered-id']
  if info['pending'] > 0 then id = redis.call('XPENDING', KEYS[1], info['name'])[2] end
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  ms, seq = tonumber(ms), tonumber(seq)
  if bound == nil or ms < bms or (ms == bms and seq < bseq) then bound, bms, bseq = id, ms, seq end
end
return redis.call('XTRIM', KEYS[1], 'MINID', '~', bound)
"""


class Entry(NamedTuple):  # a tuple: the consumer makes 10k of them per batch
    """One delivered log entry: its id in the log, the encoded record (None when the entry has no record
    field at all) and how many times it has been delivered, this time included."""

    id: str
    raw: bytes | None
    deliveries: int


@dataclass(frozen=True)
class Lag:
    """Entries the consumer has not stored yet: never delivered, and delivered but not acknowledged.
    `undelivered` is None when Redis cannot tell (after entries were deleted from the middle)."""

    undelivered: int | None
    pending: int

    @property
    def total(self) -> int | None:
        return None if self.undelivered is None else self.undelivered + self.pending


class EventLog(Protocol):
    """The producer side: what `POST /events` and `recflow publish` use."""

    where: str  # the URL and stream, or the spool file, for messages

    def append(self, records: Sequence[Mapping[str, Any]]) -> int:
        """Append raw event records (the event contract, not validated here); durable when it returns
        (Redis: as durable as the server's persistence settings). Returns how many were appended."""
        ...

    def ping(self) -> None:
        """Raise EventLogUnavailableError, naming the URL or path, when the log cannot be written."""
        ...


class EventSource(Protocol):
    """The consumer side, used by `recflow.stream.consumer.drain`."""

    where: str
    dead_letters: str  # where `dead_letter` puts entries, for messages
    read_ahead: bool  # whether `read_new` may run in another thread while earlier entries are stored

    def recover(self, count: int) -> list[Entry]:
        """Entries delivered before but never acknowledged (this consumer's own, then a dead consumer's)."""
        ...

    def claim(self, count: int) -> list[Entry]:
        """Entries that another consumer was given and left idle for `claim_idle_ms` (it died)."""
        ...

    def read_new(self, count: int, block_ms: int | None) -> list[Entry]:
        """Up to `count` entries never delivered before, waiting up to `block_ms` (None: do not wait)."""
        ...

    def ack(self, entries: Sequence[Entry]) -> None:
        """Mark entries as done (stored or rejected with a reason): they are never delivered again."""
        ...

    def dead_letter(self, entries: Sequence[tuple[Entry, str]]) -> None:
        """Move poison entries, each with its reason, to the dead-letter log, and acknowledge them."""
        ...

    def release(self, entries: Sequence[Entry]) -> None:
        """Do not count this delivery of `entries` (they failed for a reason outside them, e.g. a full disk)."""
        ...

    def lag(self) -> Lag: ...

    def close(self) -> None: ...


def open_event_log(settings: EventLogSettings, root: Path = Path(".")) -> EventLog:
    """The configured event log: Redis Streams when a URL is set (`settings.redis_url`, overridden by the
    RECFLOW_REDIS_URL environment variable), else the spool under `root / settings.spool`. Opening does
    not connect; call `ping()` to check the log is reachable."""
    resolved = settings.resolved(os.environ)
    if resolved.redis_url:
        return RedisStreamLog(resolved, resolved.redis_url)
    from recflow.stream.spool import SpoolLog

    return SpoolLog(resolved, Path(root) / resolved.spool)


def open_event_source(
    settings: EventLogSettings, root: Path = Path("."), *, consumer: str | None = None
) -> EventSource:
    """The configured event log opened for consuming: checks it is reachable and, for Redis, creates the
    consumer group (reading from the start of the stream) when it does not exist yet."""
    resolved = settings.resolved(os.environ)
    if resolved.redis_url:
        log = RedisStreamLog(resolved, resolved.redis_url, consumer=consumer)
        log.ensure_group()
        return log
    from recflow.stream.spool import SpoolLog

    spool = SpoolLog(resolved, Path(root) / resolved.spool)
    spool.lock_consumer()
    return spool


@dataclass(frozen=True)
class PublishReport:
    published: int
    unreadable: list[Rejection]  # records of the file that could not even be read as rows: not published


def publish_file(
    log: EventLog, path: Path, *, chunk: int = 10_000, progress: Callable[[int, int], None] | None = None
) -> PublishReport:
    """Append the records of an event file (.jsonl/.json, .csv, .parquet; read by `eventio.read_event_file`,
    not validated: the consumer's store does that) to `log`, `chunk` records per append. Timestamp columns
    are sent as ISO-8601 text (a naive one stays naive, so the store rejects it with its reason)."""
    table, unreadable = read_event_file(path)
    table = table.drop_columns([c for c in (RECORD_COLUMN, RAW_COLUMN) if c in table.column_names])
    for index, column in enumerate(table.schema):
        if pa.types.is_timestamp(column.type):
            iso = "%Y-%m-%dT%H:%M:%SZ" if column.type.tz else "%Y-%m-%dT%H:%M:%S"
            table = table.set_column(index, column.name, pc.strftime(table.column(index), format=iso))
    done = 0
    for batch in table.to_batches(max_chunksize=chunk):
        rows = batch.to_pylist()
        done += log.append([{k: v for k, v in row.items() if v is not None} for row in rows])
        if progress is not None:
            progress(done, table.num_rows)
    return PublishReport(published=done, unreadable=unreadable)


def encode(record: Mapping[str, Any]) -> bytes:
    """One record as compact ASCII JSON (no raw newlines: one spool line, one stream field)."""
    return json.dumps(record, separators=(",", ":"), default=_json_default).encode()


def _json_default(value: Any) -> str:
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"event field value {value!r} of type {type(value).__name__} is not JSON")


def _messages(reply: Any) -> list[Any]:
    """The [id, fields] pairs of a raw XREADGROUP reply for one stream (RESP3: a map, RESP2: a list)."""
    if not reply:
        return []
    [(_, messages)] = reply.items() if isinstance(reply, dict) else reply
    return messages or []


def _record(fields: Any) -> bytes | None:
    """The record field of an entry's fields (a flat list or a dict); None when absent or deleted."""
    if isinstance(fields, dict):
        return fields.get(_FIELD)
    pairs = dict(zip(fields[::2], fields[1::2], strict=True)) if fields else {}
    return pairs.get(_FIELD)


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# -- Redis Streams ---------------------------------------------------------------------------------------


class RedisStreamLog:
    """The event log on a Redis stream (see the module docstring)."""

    def __init__(self, settings: EventLogSettings, url: str, *, consumer: str | None = None) -> None:
        self.settings = settings
        self.url = redact(url)
        self.consumer = consumer or settings.consumer or socket.gethostname()
        self.where = f"{self.url} stream {settings.stream}"
        self.dead_letters = f"{self.url} stream {settings.dead_letter_stream}"
        self.read_ahead = True  # the client is thread-safe (a connection per command)
        self._client = redis.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=settings.block_ms / 1000 + 10.0
        )
        # replies of XREADGROUP as they come (no dict per entry): `_messages` reads them
        self._client.set_response_callback("XREADGROUP", lambda reply, **_: reply)
        self._trim = self._client.register_script(_TRIM)
        self._add = self._client.register_script(_ADD)

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise EventLogUnavailableError(
                f"Redis at {self.url} is unreachable ({exc}); start it, or point eventlog.redis_url or "
                "RECFLOW_REDIS_URL at a running server (leave both unset to use the local spool)"
            ) from exc

    def ping(self) -> None:
        with self._reaching():
            self._client.ping()

    def append(self, records: Sequence[Mapping[str, Any]]) -> int:
        encoded = [encode(record) for record in records]
        if not encoded:
            return 0
        with self._reaching():
            pipe = self._client.pipeline(transaction=False)
            for start in range(0, len(encoded), _SCRIPT_CHUNK):
                self._add(keys=[self.settings.stream], args=encoded[start : start + _SCRIPT_CHUNK], client=pipe)
            pipe.execute()
        return len(encoded)

    def ensure_group(self) -> None:
        with self._reaching():
            try:
                self._client.xgroup_create(self.settings.stream, self.settings.group, id="0", mkstream=True)
                logger.info("created consumer group %s on %s", self.settings.group, self.where)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _group_call(self, call: Any) -> Any:
        """Run `call()`; when the group is gone (Redis restarted without its data), recreate it and retry."""
        with self._reaching():
            try:
                return call()
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                logger.warning("consumer group %s is missing on %s: creating it again", self.settings.group, self.url)
                self.ensure_group()
                return call()

    def recover(self, count: int) -> list[Entry]:
        s = self.settings
        messages = _messages(
            self._group_call(lambda: self._client.xreadgroup(s.group, self.consumer, {s.stream: "0"}, count=count))
        )
        return self._counted(messages) if messages else self.claim(count)

    def claim(self, count: int) -> list[Entry]:
        s = self.settings
        _, messages, deleted = self._group_call(
            lambda: self._client.xautoclaim(s.stream, s.group, self.consumer, s.claim_idle_ms, "0-0", count=count)
        )
        if deleted:
            shown = ", ".join(d.decode() for d in deleted[:10])
            logger.error("%d pending entries of %s were deleted before they were stored (XDEL or XTRIM by hand): %s",
                         len(deleted), self.where, shown)  # fmt: skip
        if messages:
            logger.warning("claimed %d entries idle for %d ms from a dead consumer", len(messages), s.claim_idle_ms)
        return self._counted(messages)

    def _counted(self, messages: list[Any]) -> list[Entry]:
        """Entries of re-delivered messages, with the delivery counts of the consumer group's PEL."""
        if not messages:
            return []
        s = self.settings
        ids = [m[0] for m in messages]
        with self._reaching():
            pending = self._client.xpending_range(
                s.stream, s.group, min=ids[0], max=ids[-1], count=len(ids), consumername=self.consumer
            )
        times = {p["message_id"]: int(p["times_delivered"]) for p in pending}
        return [Entry(i.decode(), _record(fields), times.get(i, 1)) for i, fields in messages]

    def read_new(self, count: int, block_ms: int | None) -> list[Entry]:
        s = self.settings
        reply = self._group_call(
            lambda: self._client.xreadgroup(s.group, self.consumer, {s.stream: ">"}, count=count, block=block_ms)
        )
        return [
            Entry(i.decode(), fields[1] if fields and fields[0] == _FIELD else _record(fields), 1)
            for i, fields in _messages(reply)
        ]

    def ack(self, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        s = self.settings
        with self._reaching():
            pipe = self._client.pipeline(transaction=False)
            pipe.xack(s.stream, s.group, *(e.id for e in entries))
            self._trim(keys=[s.stream], args=[s.maxlen], client=pipe)
            acked, trimmed = pipe.execute(raise_on_error=False)
        if isinstance(acked, Exception):
            raise acked
        if isinstance(trimmed, Exception):  # the stream keeps its entries: nothing is lost, say why
            logger.warning("trimming %s failed: %s", self.where, trimmed)

    def dead_letter(self, entries: Sequence[tuple[Entry, str]]) -> None:
        if not entries:
            return
        s = self.settings
        with self._reaching():
            pipe = self._client.pipeline(transaction=True)
            for entry, reason in entries:
                fields: dict[FieldT, EncodableT] = {
                    FIELD: entry.raw or b"",
                    "reason": reason,
                    "id": entry.id,
                    "stream": s.stream,
                    "deliveries": entry.deliveries,
                }
                pipe.xadd(s.dead_letter_stream, fields)
            pipe.xack(s.stream, s.group, *(e.id for e, _ in entries))
            pipe.execute()

    def release(self, entries: Sequence[Entry]) -> None:
        s = self.settings
        by_count: dict[int, list[StreamIdT]] = {}
        for entry in entries:
            by_count.setdefault(entry.deliveries, []).append(entry.id)
        with self._reaching():
            for deliveries, ids in by_count.items():
                self._client.xclaim(s.stream, s.group, self.consumer, 0, ids, retrycount=deliveries - 1, justid=True)

    def lag(self) -> Lag:
        with self._reaching():
            try:
                groups = self._client.xinfo_groups(self.settings.stream)
            except redis.ResponseError:  # no stream (yet, or after a restart without persistence)
                return Lag(undelivered=None, pending=0)
        for group in groups:
            if group["name"].decode() == self.settings.group:
                return Lag(undelivered=group.get("lag"), pending=group["pending"])
        return Lag(undelivered=None, pending=0)

    def close(self) -> None:
        self._client.close()
