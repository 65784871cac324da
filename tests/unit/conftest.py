"""Unit tests are pure: a test here that starts a process fails at once and says where it belongs."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a unit test started a process ({args!r}): move the test to tests/integration")

    # every subprocess call (run, check_output, Popen) goes through _execute_child
    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
