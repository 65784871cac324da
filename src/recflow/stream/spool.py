"""The local spool: the event log as one fsync'd append-only file, for a single machine without Redis
(the embedded default of recflow.stream.log; see its docstring for the contract).

Layout of `eventlog.spool` (outside data/, which DVC owns):

- `events.jsonl`: one JSON record per line. Writers append under an exclusive flock and fsync before
  `append` returns; a writer that died mid-line is healed by the next one, which ends that line first (the
  fragment is then dead-lettered as undecodable). Readers take complete lines only.
- `position.json` (written atomically): `offset`, every line before it acknowledged; `end`, lines up to it
  delivered `deliveries` times and not all acknowledged (a restarted consumer re-delivers them, counted).
- `consumer.lock`: one consumer at a time. `dead-letter.jsonl`: poison lines with their reason.

When the consumer has acknowledged every line, the file is truncated (under the writers' lock, after the
position was reset: a crash in between re-delivers lines the store already holds, which it drops).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recflow.config import EventLogSettings
from recflow.errors import EventLogUnavailableError
from recflow.files import atomic_path, fsync_dir
from recflow.stream.log import Entry, Lag, encode

logger = logging.getLogger(__name__)

_POLL_SECONDS = 0.05


@dataclass
class _Position:
    offset: int = 0  # every line before this byte is acknowledged
    end: int = 0  # lines in [offset, end) were delivered `deliveries` times and not all acknowledged
    deliveries: int = 0


class SpoolLog:
    """The event log as an fsync'd append-only file (see the module docstring)."""

    def __init__(self, settings: EventLogSettings, folder: Path) -> None:
        self.settings = settings
        self.folder = Path(folder)
        self.path = self.folder / "events.jsonl"
        self.where = f"spool {self.path}"
        self.dead_letters = str(self.folder / "dead-letter.jsonl")
        self.read_ahead = False  # the position is plain state of this object
        self._lock_fd: int | None = None
        self._lines: list[tuple[int, int]] = []  # (start, end) of the delivered, unacknowledged lines
        self._acked: set[int] = set()
        self._position = _Position()

    def ping(self) -> None:
        try:
            created = not self.path.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
            if created:  # an append that returned must survive a power cut, the file's name included
                fsync_dir(self.folder)
        except OSError as exc:
            raise EventLogUnavailableError(
                f"the spool {self.path} cannot be written ({exc}); check the folder (eventlog.spool) "
                "or configure Redis (RECFLOW_REDIS_URL)"
            ) from exc

    def append(self, records: Sequence[Mapping[str, Any]]) -> int:
        data = b"".join(encode(record) + b"\n" for record in records)
        if not data:
            return 0
        self.ping()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a writer died mid-line: end that line first
                data = b"\n" + data
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)  # also releases the lock
        return len(records)

    def lock_consumer(self) -> None:
        self.ping()
        fd = os.open(self.folder / "consumer.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EventLogUnavailableError(
                f"another consumer is draining {self.path}; the spool takes one consumer at a time "
                "(stop the other one, or use Redis for several consumers)"
            ) from None
        self._lock_fd = fd
        self._position = self._load_position()

    def recover(self, count: int) -> list[Entry]:
        pos = self._position
        if pos.offset >= pos.end:
            return []
        lines = self._read_lines(pos.offset, pos.end, None)  # all of them: they share one delivery count
        self._position = _Position(pos.offset, pos.end, pos.deliveries + 1)
        self._save_position()
        self._lines, self._acked = [(start, end) for start, end, _ in lines], set()
        return [Entry(str(start), raw, pos.deliveries + 1) for start, _, raw in lines]

    def claim(self, count: int) -> list[Entry]:
        return []  # one consumer at a time: no other consumer's entries to take over

    def read_new(self, count: int, block_ms: int | None) -> list[Entry]:
        pos = self._position
        start = max(pos.offset, pos.end)
        deadline = time.monotonic() + (block_ms or 0) / 1000
        while not (lines := self._read_lines(start, None, count)) and time.monotonic() < deadline:
            time.sleep(_POLL_SECONDS)
        if not lines:
            return []
        if pos.offset >= pos.end:
            self._lines, self._acked = [], set()
        self._position = _Position(pos.offset, lines[-1][1], 1)
        self._save_position()
        self._lines += [(s, e) for s, e, _ in lines]
        return [Entry(str(s), raw, 1) for s, _, raw in lines]

    def ack(self, entries: Sequence[Entry]) -> None:
        self._acked.update(int(e.id) for e in entries)
        done = 0
        while done < len(self._lines) and self._lines[done][0] in self._acked:
            done += 1
        if not done:
            return
        offset = self._lines[done - 1][1]
        self._lines = self._lines[done:]
        pos = self._position
        self._position = _Position(offset, max(offset, pos.end), pos.deliveries if offset < pos.end else 0)
        self._save_position()
        if offset == self._position.end:
            self._compact()

    def dead_letter(self, entries: Sequence[tuple[Entry, str]]) -> None:
        if not entries:
            return
        lines = [
            {"id": e.id, "reason": reason, "deliveries": e.deliveries, "raw": (e.raw or b"").decode("utf-8", "replace")}
            for e, reason in entries
        ]
        created = not Path(self.dead_letters).exists()
        with Path(self.dead_letters).open("ab") as out:
            out.write(b"".join(encode(line) + b"\n" for line in lines))
            out.flush()
            os.fsync(out.fileno())
        if created:
            fsync_dir(self.folder)
        self.ack([e for e, _ in entries])

    def release(self, entries: Sequence[Entry]) -> None:
        pos = self._position
        if entries and pos.deliveries > 0:
            self._position = _Position(pos.offset, pos.end, pos.deliveries - 1)
            self._save_position()

    def lag(self) -> Lag:
        pos = self._position
        with self.path.open("rb") as handle:
            handle.seek(pos.offset)
            pending = handle.read(max(pos.end - pos.offset, 0)).count(b"\n")
            handle.seek(max(pos.offset, pos.end))
            undelivered = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
        return Lag(undelivered=undelivered, pending=pending - len(self._acked & {s for s, _ in self._lines}))

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _read_lines(self, start: int, stop: int | None, count: int | None) -> list[tuple[int, int, bytes]]:
        """Up to `count` (None: all) complete lines from byte `start` (up to `stop`): (start, end, text)."""
        lines: list[tuple[int, int, bytes]] = []
        with self.path.open("rb") as handle:
            handle.seek(start)
            for line in handle:
                if not line.endswith(b"\n") or (stop is not None and start >= stop):
                    break
                lines.append((start, start + len(line), line[:-1]))
                start += len(line)
                if len(lines) == count:
                    break
        return lines

    def _load_position(self) -> _Position:
        path = self.folder / "position.json"
        if not path.exists():
            return _Position()
        pos = _Position(**json.loads(path.read_text()))
        size = self.path.stat().st_size
        if pos.offset > size:  # the spool file was replaced behind the consumer's back: start over
            logger.warning("%s is shorter than the saved position %d: reading it from the start", self.path, pos.offset)
            return _Position()
        return pos

    def _save_position(self) -> None:
        # fsynced, and its folder after the rename: the new position must survive a power cut (see _compact)
        with atomic_path(self.folder / "position.json") as temp, temp.open("w") as out:
            json.dump(vars(self._position), out)

    def _compact(self) -> None:
        """Empty the spool file when every line of it is acknowledged (under the writers' lock). The
        position is reset first: a crash in between re-delivers acknowledged lines (the store dedups)."""
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_size != self._position.offset:
                return
            self._position = _Position()
            self._save_position()
            os.ftruncate(fd, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._lines, self._acked = [], set()
