"""Atomic files: every output of recflow is written under a hidden temporary name beside its final one and then
renamed over it, so a reader never sees half a file and a crash leaves the previous version whole.

- `atomic_path(final)`: `with atomic_path(final) as tmp:` write `tmp`; on success it is fsynced and renamed
  over `final`, and the folder is fsynced (the rename itself survives a power cut); on error it is removed.
- `atomic_dir(final)`: the same for a folder (a model bundle): fill the staging folder it gives, and it is
  swapped in with two renames (the folder it replaces is removed after); on error the staging folder is removed.
- `fsync_file`, `fsync_dir`: for writers that commit several files at once (the event store's partitions);
  `fsync_tree(folder)` for a folder another library renamed into place (a BentoML model version).
- `exclusive_lock(path)`: `with exclusive_lock(lock_file):` one process (and one thread) at a time, by an OS
  lock (flock) on that file, which is created when missing and never removed. The OS releases it when its
  holder dies, even by SIGKILL. Valid between processes of one machine on a local filesystem: flock is not
  reliable on network filesystems, and an object store has no locks at all.

Temporary names start with "." (readers and globs such as `part-*.parquet` skip them). New files and folders get
the permissions of any file the process creates (the umask applies), not the private ones of `tempfile`.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_dir", "atomic_path", "exclusive_lock", "fsync_dir", "fsync_file", "fsync_tree"]

_THREAD_LOCKS: dict[Path, threading.Lock] = {}  # flock excludes processes; this, threads of one process
_THREAD_LOCKS_GUARD = threading.Lock()


def fsync_file(path: Path) -> None:
    """Flush a file's content to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries to disk: a rename into it, or a file created in it, survives a power cut."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush a folder that was just committed (renamed into place) to disk: every file and folder in it, and the
    entry of the folder itself in its parent."""
    folder = Path(folder)
    for current, _, names in os.walk(folder):
        for name in names:
            fsync_file(Path(current) / name)
        fsync_dir(Path(current))
    fsync_dir(folder.parent)


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """`with atomic_path(final) as tmp:` write to tmp; on success tmp (fsynced) replaces final and the folder is
    fsynced, on error tmp is removed. The parent folder is created when missing."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden_sibling(final, "tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """`with atomic_dir(final) as staging:` fill the (new, empty) staging folder; on success everything in it
    is fsynced and it is swapped in for final with two renames (final moved aside, staging renamed to final),
    then the old folder is removed; on error staging is removed and final stays as it was. A crash between the
    two renames leaves no `final`, with the previous version whole in a hidden `.<name>.old-*` sibling."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = _hidden_sibling(final, "new")
    staging.mkdir()
    try:
        yield staging
        fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    retired = final.with_name(f".{final.name}.old-{staging.name.rsplit('-', 1)[-1]}")
    if final.exists():
        os.replace(final, retired)
    os.replace(staging, final)
    fsync_dir(final.parent)
    shutil.rmtree(retired, ignore_errors=True)


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created when missing, with its folder) for the `with` block, waiting for
    any other holder. Threads of one process take turns too (each open file is a lock of its own for flock,
    so two threads of one process would otherwise both enter: the thread lock orders them first)."""
    path = Path(path)
    with _THREAD_LOCKS_GUARD:
        thread_lock = _THREAD_LOCKS.setdefault(path.absolute(), threading.Lock())
    with thread_lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # also releases the lock


def _hidden_sibling(final: Path, kind: str) -> Path:
    """A fresh hidden name beside `final`: `.<name>.<kind>-<random>`."""
    return final.with_name(f".{final.name}.{kind}-{secrets.token_hex(6)}")
