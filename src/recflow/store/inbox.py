"""The inbox: a folder where event files arrive, each ingested once.

`ingest_inbox` ingests the event files of the inbox that it has not ingested before and records each one, once
stored, in `<inbox>/.ingested.jsonl` (name and size; appended and fsynced): a scheduled ingest reads only the
files that arrived since, so its cost follows the new data, not the inbox's history. Files are left where they
are: the inbox and its manifest are part of the DVC-tracked data folder, so the manifest holds nothing that
differs between machines (no modification times) and the same data step gives the same `data.dvc` on a fresh
clone. A file is known by its name and size: one replaced under the same name with another size is ingested
again (the store drops the events it already holds); drop new events under a new name, as producers of an inbox
do. A crash between the store commit and the manifest line re-reads that one file, and the store drops it all
as duplicates.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from recflow.config import EventSettings
from recflow.events.fileio import EVENT_FILE_SUFFIXES
from recflow.files import fsync_dir
from recflow.store.eventstore import IngestReport, ingest_files

logger = logging.getLogger(__name__)

MANIFEST = ".ingested.jsonl"


def pending_files(inbox: Path) -> list[Path]:
    """The event files of the inbox not ingested yet (or ingested with another size), sorted by name."""
    inbox = Path(inbox)
    if not inbox.is_dir():
        return []
    done = _ingested(inbox)
    return sorted(
        path
        for path in inbox.iterdir()
        if path.suffix.lower() in EVENT_FILE_SUFFIXES
        and not path.name.startswith(".")
        and path.is_file()
        and _identity(path) not in done
    )


def ingest_inbox(
    inbox: Path,
    *,
    store: Path,
    rejected: Path,
    settings: EventSettings,
    now: datetime | None = None,
    on_file: Callable[[Path, IngestReport], None] | None = None,
) -> IngestReport:
    """Ingest the inbox files not ingested before (`pending_files`), one batch each, recording each in the
    manifest once it is stored. An empty report when nothing is new."""
    total = IngestReport()
    for path in pending_files(inbox):
        identity = _identity(path)  # before reading: a file still growing meanwhile is read again next time
        report = ingest_files([path], store=store, rejected=rejected, settings=settings, now=now)
        _record(Path(inbox), identity)
        if on_file is not None:
            on_file(path, report)
        total = total + report
    return total


def _identity(path: Path) -> tuple[str, int]:
    return path.name, path.stat().st_size


def _ingested(inbox: Path) -> set[tuple[str, int]]:
    manifest = inbox / MANIFEST
    if not manifest.exists():
        return set()
    done = set()
    for line in manifest.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            done.add((str(entry["name"]), int(entry["size"])))
        except (ValueError, KeyError, TypeError):  # a line torn by a crash: that file is read again
            logger.warning("%s: skipping an unreadable line %r", manifest, line[:80])
    return done


def _record(inbox: Path, identity: tuple[str, int]) -> None:
    manifest = inbox / MANIFEST
    created = not manifest.exists()
    name, size = identity
    line = json.dumps({"name": name, "size": size}) + "\n"
    fd = os.open(manifest, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size_before = os.fstat(fd).st_size
        if size_before and os.pread(fd, 1, size_before - 1) != b"\n":  # a line torn by a crash: end it first
            line = "\n" + line
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(inbox)
