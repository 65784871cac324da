"""The rejected log: every record that was not stored, with its reason, kept once.

Layout of the rejected folder: `rejected-<UTC time>-<digest>.jsonl`, one JSON object per record {source, record,
code, reason, raw}, and `.keys`, the 64-bit key of every record logged so far (little-endian uint64, appended).

A record's key is a hash of its code and its text (`raw`): like an event without an event_id, a refused record
that comes again (a re-delivered stream batch, a file ingested twice) is the same record, and is not logged
again; it is still counted as rejected in the report of its batch. The file of a batch is named by the digest
of the keys it holds and written before the keys are appended, so a crash in between leaves a file that the
replay writes again under the same name: nothing is logged twice, nothing is lost. The caller holds the
store's writer lock (`recflow.store.eventstore`). The keys take 8 bytes per distinct rejected record.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recflow.events.contract import Rejection, json_objects
from recflow.files import atomic_path, fsync_dir

KEYS_FILE = ".keys"


def rejection_key(rejection: Rejection) -> int:
    """The 64-bit key of a refused record: its code and its text."""
    text = f"{rejection.code}\x1f{rejection.raw}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def write_rejected(rejections: Sequence[Rejection], folder: Path) -> Path | None:
    """Log the rejections that are not logged yet, atomically; returns the file written (None: nothing new)."""
    folder = Path(folder)
    keys = np.fromiter((rejection_key(r) for r in rejections), np.uint64, len(rejections))
    _, first = np.unique(keys, return_index=True)
    fresh = np.zeros(len(keys), bool)
    fresh[first] = True  # once within the batch
    fresh &= ~np.isin(keys, _logged_keys(folder))  # and once across batches
    if not fresh.any():
        return None
    new = [r for r, keep in zip(rejections, fresh, strict=True) if keep]
    digest = hashlib.blake2b(np.sort(keys[fresh]).tobytes(), digest_size=8).hexdigest()
    replayed = sorted(folder.glob(f"rejected-*-{digest}.jsonl"))  # written before a crash, keys not recorded
    path = replayed[0] if replayed else folder / f"rejected-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{digest}.jsonl"
    _write_lines(new, path)
    _append_keys(keys[fresh], folder / KEYS_FILE)
    return path


def _logged_keys(folder: Path) -> np.ndarray:
    path = folder / KEYS_FILE
    if not path.exists():
        return np.zeros(0, np.uint64)
    data = path.read_bytes()
    return np.frombuffer(data, "<u8", count=len(data) // 8).astype(np.uint64)  # a torn last key is ignored


def _append_keys(keys: np.ndarray, path: Path) -> None:
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        os.ftruncate(fd, size - size % 8)  # a key torn by a crash is dropped (its file is rewritten on replay)
        os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(keys.astype("<u8").tobytes())
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


def _write_lines(rejections: Sequence[Rejection], path: Path) -> None:
    """One JSON object per rejection {source, record, code, reason, raw}, written atomically."""
    table = pa.table(
        {
            "source": pa.array([r.source for r in rejections], pa.string()),
            "record": pa.array([r.record for r in rejections], pa.int64()),
            "code": pa.array([r.code for r in rejections], pa.string()),
            "reason": pa.array([r.reason for r in rejections], pa.string()),
            "raw": pa.array([r.raw for r in rejections], pa.string()),
        }
    )
    lines = pc.binary_join_element_wise(json_objects(table), "\n", "").combine_chunks()
    _, offsets, data = lines.buffers()  # the lines lie back to back in `data`: write them as they are
    bounds = np.frombuffer(offsets, np.int32, count=len(lines) + 1, offset=4 * lines.offset)
    with atomic_path(path) as temp, temp.open("wb") as handle:
        handle.write(memoryview(data)[bounds[0] : bounds[-1]])
