"""The users file of `recflow recommend`: ids and `--as-of column` moments, with errors that say what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from recflow.errors import InputFileError
from recflow.model.recommend import parse_moment, read_moments, read_user_ids


def test_csv_and_jsonl_give_ids_and_moments_in_file_order(tmp_path: Path) -> None:
    csv = tmp_path / "users.csv"
    csv.write_text("user_id,as_of\n7,2024-01-01T00:00:00Z\nb,1700000000\n")
    jsonl = tmp_path / "users.jsonl"
    jsonl.write_text('{"user_id": 7, "as_of": "2024-01-01T01:00:00+01:00"}\n\n{"user_id": "b", "as_of": 1700000000}\n')
    for path in (csv, jsonl):
        assert read_user_ids(path) == ["7", "b"]
        assert read_moments(path) == [1704067200.0, 1700000000.0]


def test_a_malformed_line_or_missing_value_is_named(tmp_path: Path) -> None:
    """Regression: a malformed JSONL line in a users file read for --as-of raised a traceback."""
    jsonl = tmp_path / "users.jsonl"
    jsonl.write_text('{"user_id": "a", "as_of": 1}\n{bad\n')
    with pytest.raises(InputFileError, match="line 2: expected an object with as_of"):
        read_moments(jsonl)
    csv = tmp_path / "users.csv"
    csv.write_text("user_id\na\n")
    with pytest.raises(InputFileError, match="has no as_of column"):
        read_moments(csv)
    with pytest.raises(InputFileError, match="needs a CSV or JSONL users file"):
        read_moments(tmp_path / "users.txt")


def test_a_time_without_offset_is_refused() -> None:
    assert parse_moment("2024-01-01T00:00:00Z") == 1704067200.0
    with pytest.raises(InputFileError, match="no UTC offset"):
        parse_moment("2024-01-01T00:00:00")
    with pytest.raises(InputFileError, match="is not a time"):
        parse_moment("yesterday")
