"""bundle.save_bundle_atomically: a bundle folder is replaced whole or not at all (regression test for a crash
while saving the production bundle, which used to leave new factors beside the old bundle.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from recflow.model.bundle import save_bundle_atomically


class FakeBundle:
    """Writes its files one by one, like ModelBundle.save; `fail_after` files written, it raises."""

    def __init__(self, content: str, fail_after: int | None = None) -> None:
        self.content, self.fail_after = content, fail_after

    def save(self, path: Path) -> None:
        for i, name in enumerate(("als.npz", "history.npz", "bundle.json")):
            if i == self.fail_after:
                raise OSError(28, "No space left on device")
            (path / name).write_text(f"{self.content} {name}")


def files(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_a_crash_while_saving_leaves_the_previous_bundle_whole(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    save_bundle_atomically(cast(Any, FakeBundle("old")), target)
    with pytest.raises(OSError, match="No space left"):
        save_bundle_atomically(cast(Any, FakeBundle("new", fail_after=1)), target)
    assert files(target) == {n: f"old {n}" for n in ("als.npz", "bundle.json", "history.npz")}
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging or retired folder left behind


def test_a_complete_save_replaces_every_file(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    save_bundle_atomically(cast(Any, FakeBundle("old")), target)
    (target / "stale.txt").write_text("from an older layout")
    save_bundle_atomically(cast(Any, FakeBundle("new")), target)
    assert files(target) == {n: f"new {n}" for n in ("als.npz", "bundle.json", "history.npz")}
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
