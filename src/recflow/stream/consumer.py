"""The consumer: drains the event log (recflow.stream.log) into the event store (recflow.store.eventstore).

Each batch is handed to `store.ingest_json_lines` as the JSON Lines text of its entries: the same reading,
validation, dedup by event_id and atomic Parquet write as `recflow ingest` of a .jsonl file, and a rejected
log with a reason for every record that is not a valid event (`bad_json`, `unknown_action`, ...). The store
takes its writer lock around each commit, so the consumer may run beside `recflow ingest`, the ingest flow and
other consumers; the batch is acknowledged only after the store returned. A crash anywhere re-delivers the
unacknowledged entries; the store drops the ones already stored, so every event is stored exactly once.
Nothing is lost silently: each entry read ends as stored, duplicate, rejected (in the rejected log) or
dead-lettered (with its reason).

Poison entries, which the store cannot even be given or which make it fail, go to the dead-letter log
instead of blocking the rest:

- an entry with no `event` field (or a multi-line one that is not JSON): at once, retrying cannot change it;
- an entry whose store write raises (e.g. a lone UTF-16 surrogate, valid JSON that Arrow cannot encode):
  the batch is split in halves until the failing entries stand alone; an entry that still fails alone is
  dead-lettered with the error, its neighbours are stored;
- an entry that keeps killing its consumer (crash, OOM kill) before it is acknowledged: entries delivered
  `max_deliveries` times are stored one by one, each acknowledged at once; if the consumer dies among them,
  the entry it died on is dead-lettered on its next delivery (the oldest one delivered more often).

A drain first re-reads what was delivered before and never acknowledged (its own pending entries, then a
dead consumer's, claimed after `claim_idle_ms`; claims are repeated every `claim_idle_ms`), then new
entries. With Redis the next batch is read in a thread while the current one is stored (`_ReadAhead`).

Only a record the validator rejects (the rejected log) or one that fails alone when isolated (dead-lettered) is
the records' fault. Failures of the environment never dead-letter, reject or acknowledge anything: unreadable
store files (`CorruptStoreError`, naming them), out of memory, a full disk (ENOSPC), missing permissions and
other OSErrors, DuckDB I/O errors. `follow` retries the batch with back-off (up to 10 s apart), logging the
reason; otherwise the entries are released (the delivery is not counted) and `StoreWriteError` is raised with
the reason (`recflow consume` exits non-zero). When the log itself is unreachable (Redis down or restarting,
a connection lost), `follow` waits and reconnects; otherwise EventLogUnavailableError is raised. Pending entries
stay in the log and are re-delivered.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import duckdb

from recflow.config import EventLogSettings, Settings
from recflow.errors import CorruptStoreError, EventLogUnavailableError, StoreWriteError
from recflow.store.eventstore import IngestReport, ingest_json_lines
from recflow.stream.log import FIELD, Entry, EventSource, Lag, encode, open_event_source

logger = logging.getLogger(__name__)

# not the records' fault: never dead-letter (OSError covers a full disk, permissions, an unreachable folder;
# RuntimeError the state of the process, e.g. "cannot schedule new futures after interpreter shutdown")
_ENVIRONMENT_ERRORS = (
    OSError,
    MemoryError,
    RuntimeError,
    CorruptStoreError,
    duckdb.IOException,
    duckdb.OutOfMemoryException,
)
_MAX_BACKOFF_SECONDS = 10.0


@dataclass
class DrainReport:
    """What a drain did: `read = stored + duplicate + rejected + dead_lettered` (each entry read once
    counts once; a re-delivered entry that was already stored counts as a duplicate)."""

    read: int = 0
    stored: int = 0
    duplicate: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    batches: int = 0
    reconnects: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # rejection code -> count (see store.IngestReport)
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)  # short poison kind -> count
    rejected_paths: tuple[Path, ...] = ()
    lag: Lag | None = None  # after the last batch
    where: str = ""  # the log drained
    dead_letters: str = ""  # where its dead letters go

    def add(self, ingest: IngestReport, dead: Sequence[tuple[Entry, str]]) -> None:
        self.read += ingest.read + len(dead)
        self.stored += ingest.stored
        self.duplicate += ingest.duplicate
        self.rejected += ingest.rejected
        self.dead_lettered += len(dead)
        self.reasons = dict(Counter(self.reasons) + Counter(ingest.reasons))
        kinds = Counter(reason.split(":", 1)[0] for _, reason in dead)
        self.dead_letter_reasons = dict(Counter(self.dead_letter_reasons) + kinds)
        self.rejected_paths += ingest.rejected_paths
        self.batches += 1


def drain(
    settings: Settings,
    *,
    follow: bool = False,
    root: Path = Path("."),
    consumer: str | None = None,
    stop: threading.Event | None = None,
    on_batch: Callable[[DrainReport], None] | None = None,
    now: datetime | None = None,
) -> DrainReport:
    """Store everything pending and new in the event log (settings.eventlog) into the event store
    (settings.paths, relative to `root`), acknowledging each batch after it is stored.

    Without `follow` it returns once the log holds nothing more to read. With `follow` it keeps waiting for
    new entries, reconnecting after outages of the log, until `stop` is set. A log that is unreachable at the
    start raises EventLogUnavailableError (naming the URL) in both modes. `consumer` overrides the consumer
    name (Redis), `on_batch` sees the running report after every batch, `now` is the validation clock."""
    conf = settings.eventlog
    stop = stop or threading.Event()
    report = DrainReport()
    source = open_event_source(conf, root, consumer=consumer)  # unreachable at the start: raise, even in follow
    report.where, report.dead_letters = source.where, source.dead_letters
    target = _Target(settings, Path(root) / settings.paths.store, Path(root) / settings.paths.rejected, now)
    ahead: _ReadAhead | None = None
    recovering, last_claim, backoff = True, time.monotonic(), 0.5

    def store(entries: list[Entry]) -> None:
        ingest, dead = _process(entries, target, source, follow, stop)
        report.add(ingest, dead)
        report.lag = source.lag()
        if on_batch is not None:
            on_batch(report)

    try:
        while not stop.is_set():
            try:
                if recovering:  # what this consumer (or a dead one) was given before: first
                    entries = source.recover(conf.batch_size)
                    if entries:
                        store(entries)
                        continue
                    recovering, last_claim = False, time.monotonic()
                    if source.read_ahead:
                        ahead = _ReadAhead(source, conf, follow)
                entries = ahead.take(stop) if ahead is not None else _read_new(source, conf, follow, stop)
                if entries:
                    store(entries)
                elif not follow:
                    break
                if time.monotonic() - last_claim > conf.claim_idle_ms / 1000:  # consumers that died meanwhile
                    last_claim = time.monotonic()
                    while claimed := source.claim(conf.batch_size):
                        store(claimed)
                backoff = 0.5
            except EventLogUnavailableError as exc:
                if not follow:
                    raise
                logger.warning("%s; retrying in %.1f s", exc, backoff)
                if ahead is not None:  # what it read stays pending in the log: recovered after the reconnect
                    ahead.close()
                    ahead = None
                recovering = True
                report.reconnects += 1
                stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
        if ahead is not None:  # stopped: store the batch already read rather than leave it pending
            for entries in ahead.close():
                store(entries)
        if report.lag is None:
            report.lag = source.lag()
    finally:
        if ahead is not None:
            ahead.close()
        source.close()
    return report


def _read_new(source: EventSource, conf: EventLogSettings, follow: bool, halt: threading.Event) -> list[Entry]:
    """New entries: in `follow`, wait up to block_ms for the first, then up to linger_ms for more."""
    count = conf.batch_size
    if not follow:
        return source.read_new(count, None)
    entries = source.read_new(count, conf.block_ms)
    deadline = time.monotonic() + conf.linger_ms / 1000
    while entries and len(entries) < count and not halt.is_set():
        left = int((deadline - time.monotonic()) * 1000)
        if left <= 0:
            break
        entries += source.read_new(count - len(entries), left)
    return entries


class _ReadAhead:
    """Reads the next batch of new entries in a thread while the current one is stored: reading (Redis and
    its reply parser) and storing (Arrow, DuckDB, Parquet) then share the time. Holds one batch at most; an
    error of the log is raised by `take`. Entries read but never taken stay pending in the log."""

    def __init__(self, source: EventSource, conf: EventLogSettings, follow: bool) -> None:
        self._queue: queue.Queue[list[Entry] | BaseException] = queue.Queue(maxsize=1)
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source, conf, follow), name="read-ahead", daemon=True)
        self._thread.start()

    def _run(self, source: EventSource, conf: EventLogSettings, follow: bool) -> None:
        while not self._halt.is_set():
            try:
                entries: list[Entry] | BaseException = _read_new(source, conf, follow, self._halt)
            except Exception as exc:  # handed to the consumer's thread, which decides
                entries = exc
            while not self._halt.is_set():
                try:
                    self._queue.put(entries, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(entries, BaseException) or (not entries and not follow):
                return

    def take(self, stop: threading.Event) -> list[Entry]:
        while not stop.is_set():
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
            return item
        return []

    def close(self) -> list[list[Entry]]:
        """Stop reading; returns the batches read and not taken (the caller may still store them)."""
        self._halt.set()
        self._thread.join()
        left = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, list) and item:
                left.append(item)
        return left


@dataclass(frozen=True)
class _Target:
    settings: Settings
    store: Path
    rejected: Path
    now: datetime | None


def _process(
    entries: list[Entry], target: _Target, source: EventSource, follow: bool, stop: threading.Event
) -> tuple[IngestReport, list[tuple[Entry, str]]]:
    """Store one batch of entries; dead-letter its poison; acknowledge the rest. Returns what happened."""
    max_deliveries = target.settings.eventlog.max_deliveries
    # Suspects (delivered max_deliveries times or more) are stored first, one by one, each acknowledged at
    # once, in log order. So when a consumer dies among them, the oldest suspect still pending is the one it
    # died on: that entry alone is dead-lettered once it is past max_deliveries; the others are tried again.
    crashed_on = next((e for e in entries if e.deliveries > max_deliveries), None)
    dead: list[tuple[Entry, str]] = []
    batch: list[tuple[Entry, bytes]] = []
    alone: list[tuple[Entry, bytes]] = []
    for entry in entries:
        if entry is crashed_on:
            reason = (
                f"crashed: delivered {entry.deliveries} times (eventlog.max_deliveries {max_deliveries}), the "
                "last times alone, and never stored: the consumer died or failed while storing it"
            )
            dead.append((entry, reason))
            continue
        line, problem = _one_line(entry)
        if line is None:
            dead.append((entry, problem))
        elif entry.deliveries >= max_deliveries:
            alone.append((entry, line))
        else:
            batch.append((entry, line))

    def store_all() -> tuple[IngestReport, list[tuple[Entry, str]]]:
        total, failed = IngestReport(), list[tuple[Entry, str]]()
        for pair in alone:
            report, bad = _store_splitting([pair], target, source.where)
            total, failed = total + report, failed + bad
            if not bad:
                source.ack([pair[0]])
        if batch:
            report, bad = _store_splitting(batch, target, source.where)
            total, failed = total + report, failed + bad
        return total, failed

    backoff = 0.5
    while True:
        try:
            ingest, failed = store_all()
            break
        except _ENVIRONMENT_ERRORS as exc:
            message = f"storing {len(entries)} events into {target.store} failed: {_fault(exc)}"
            if not follow or stop.is_set():
                source.release(entries)
                raise StoreWriteError(
                    f"{message}; nothing was dead-lettered or acknowledged, the entries stay in {source.where}: "
                    "fix that and run `recflow consume` again"
                ) from exc
            logger.error("%s; retrying in %.1f s", message, backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
    dead += failed
    if dead:
        first, reason = dead[0]
        logger.error("dead-lettering %d entries of %s to %s, e.g. %s: %s", len(dead), source.where,
                     source.dead_letters, first.id, reason)  # fmt: skip
        source.dead_letter(dead)
    failed_ids = {entry.id for entry, _ in dead}
    source.ack([entry for entry in entries if entry.id not in failed_ids])
    return ingest, dead


def _fault(exc: BaseException) -> str:
    """What went wrong in the environment, in words that say what to fix."""
    errno = getattr(exc, "errno", None)
    if isinstance(exc, CorruptStoreError):
        return str(exc)
    if errno == 28:  # ENOSPC
        return f"the disk is full ({exc}): free space"
    if isinstance(exc, PermissionError) or errno in (1, 13, 30):  # EPERM, EACCES, EROFS
        return f"permission denied ({exc}): let this user write the store and rejected folders"
    if isinstance(exc, MemoryError | duckdb.OutOfMemoryException):
        return f"out of memory ({type(exc).__name__}: {exc}): lower eventlog.batch_size or free memory"
    return f"{type(exc).__name__}: {exc}"


def _one_line(entry: Entry) -> tuple[bytes | None, str]:
    """The entry's record as one line of JSON Lines (what the store reads), or None and why not."""
    if entry.raw is None:
        return None, f"undecodable: the entry has no '{FIELD}' field; publish with `recflow publish` or EventLog.append"
    if b"\n" not in entry.raw and b"\r" not in entry.raw:
        return entry.raw, ""
    try:  # JSON spread over several lines (EventLog.append never writes that): make it one line
        return encode(json.loads(entry.raw.decode())), ""
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return None, "undecodable: line breaks in an entry that is not JSON, so it cannot be one JSON line"


def _store_splitting(
    pairs: list[tuple[Entry, bytes]], target: _Target, where: str
) -> tuple[IngestReport, list[tuple[Entry, str]]]:
    """Store the records of `pairs` (entry, JSON line); when that raises for a reason in the records, store
    each half on its own, down to single records. Returns what was stored and the entries that failed alone.
    Rejected records are numbered by their position among `pairs`, from the first entry id named."""
    try:
        lines = b"\n".join(line for _, line in pairs) + b"\n"
        return _store(lines, target, f"{where} entries {pairs[0][0].id}..{pairs[-1][0].id}"), []
    except _ENVIRONMENT_ERRORS:
        raise
    except Exception as exc:  # a record the store cannot take: find it
        if len(pairs) == 1:
            return IngestReport(), [(pairs[0][0], f"store failed: {type(exc).__name__}: {exc}")]
        logger.warning(
            "a batch of %d records failed to store (%s: %s); splitting it", len(pairs), type(exc).__name__, exc
        )
        middle = len(pairs) // 2
        first, bad_first = _store_splitting(pairs[:middle], target, where)
        second, bad_second = _store_splitting(pairs[middle:], target, where)
        return first + second, bad_first + bad_second


def _store(lines: bytes, target: _Target, source: str) -> IngestReport:
    return ingest_json_lines(
        lines,
        source=source,
        store=target.store,
        rejected=target.rejected,
        settings=target.settings.events,
        now=target.now,
    )
