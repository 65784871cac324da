"""recflow.files: a file or folder is replaced whole or not at all, and nothing hidden is left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recflow.files import atomic_dir, atomic_path


def hidden(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_a_written_file_replaces_the_old_one_and_is_as_readable_as_any_new_file(tmp_path: Path) -> None:
    final = tmp_path / "out" / "metrics.json"  # the folder is created
    with atomic_path(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".")
        tmp.write_text("old")
    with atomic_path(final) as tmp:
        tmp.write_text("new")
    assert final.read_text() == "new" and hidden(final.parent) == []
    umask = os.umask(0)
    os.umask(umask)
    assert final.stat().st_mode & 0o777 == 0o666 & ~umask  # not tempfile's private 0600


def test_an_error_while_writing_keeps_the_old_file_and_removes_the_temporary_one(tmp_path: Path) -> None:
    final = tmp_path / "metrics.json"
    final.write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic_path(final) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert final.read_text() == "old" and hidden(tmp_path) == []


def test_a_folder_is_swapped_in_whole_or_not_at_all(tmp_path: Path) -> None:
    final = tmp_path / "bundle"
    with atomic_dir(final) as staging:
        (staging / "a.npz").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as staging:
        (staging / "a.npz").write_text("new")
        raise KeyboardInterrupt
    assert (final / "a.npz").read_text() == "old" and hidden(tmp_path) == []
    with atomic_dir(final) as staging:
        (staging / "b.npz").write_text("new")
    assert [p.name for p in final.iterdir()] == ["b.npz"] and hidden(tmp_path) == []


def test_holders_of_the_lock_take_turns_across_threads(tmp_path: Path) -> None:
    import threading
    import time

    from recflow.files import exclusive_lock

    inside, most = [0], [0]

    def work() -> None:
        for _ in range(20):
            with exclusive_lock(tmp_path / "store" / ".writer.lock"):
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                time.sleep(0.001)
                inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1 and (tmp_path / "store" / ".writer.lock").exists()


def test_a_committed_tree_is_flushed_file_by_file_and_folder_by_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recflow import files

    (tmp_path / "v1" / "bundle").mkdir(parents=True)
    (tmp_path / "v1" / "bundle" / "als.npz").write_bytes(b"x")
    (tmp_path / "v1" / "metrics.json").write_text("{}")
    flushed: list[Path] = []
    monkeypatch.setattr(files, "fsync_file", flushed.append)
    monkeypatch.setattr(files, "fsync_dir", flushed.append)
    files.fsync_tree(tmp_path / "v1")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in flushed) == [
        ".", "v1", "v1/bundle", "v1/bundle/als.npz", "v1/metrics.json"
    ]  # fmt: skip
