"""Which failures the flows' I/O tasks retry: I/O errors heal by waiting, bad input or parameters do not."""

from __future__ import annotations

import pytest
from prefect.states import Failed

from flows.tasks import _retry_on_io
from recflow.errors import ConfigError, EventLogUnavailableError, InputFileError, StoreWriteError


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (OSError(28, "No space left on device"), True),
        (TimeoutError("timed out"), True),
        (EventLogUnavailableError("redis://localhost:6379 is unreachable"), True),
        (StoreWriteError("cannot write the store"), True),
        (ConfigError("params.yaml is not valid YAML"), False),
        (InputFileError("inbox/a.csv has no header"), False),
        (ValueError("a bug"), False),
    ],
)
def test_only_io_failures_are_retried(error: Exception, retried: bool) -> None:
    assert _retry_on_io(None, None, Failed(data=error)) is retried
