"""Batch recommendations: read user ids, answer from the deployable bundle, write JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.csv as pacsv

from recflow.constants import USER_ID
from recflow.errors import InputFileError
from recflow.files import atomic_path
from recflow.model.bundle import ModelBundle
from recflow.model.training import BUNDLE_DIR


def read_user_ids(path: Path) -> list[str]:
    """User ids from a text file (one per line), a CSV with a user_id column, or JSONL objects with user_id."""
    if not path.exists():
        raise InputFileError(f"user file {path} does not exist")
    if path.suffix == ".csv":
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={USER_ID: "string"}))
        if USER_ID not in table.column_names:
            raise InputFileError(f"{path} has no {USER_ID} column (columns: {', '.join(table.column_names)})")
        ids = table[USER_ID].to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        ids = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                ids.append(str(json.loads(line)[USER_ID]))
            except (ValueError, KeyError, TypeError) as exc:
                raise InputFileError(f"{path} line {number}: expected an object with {USER_ID} ({exc})") from None
    else:
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids or any(i is None or i == "" for i in ids):
        raise InputFileError(f"{path} holds no user ids, or an empty one: give one non-empty id per line")
    return [str(i) for i in ids]


def write_recommendations(models: Path, user_ids: list[str], k: int, output: Path) -> dict[str, int]:
    """Write one line per user: {"user_id", "items", "scores", "strategy"}; returns counts per strategy."""
    bundle = ModelBundle.load(models / BUNDLE_DIR)
    answers = bundle.recommend_ids(user_ids, k)
    counts = {"personalized": 0, "popular": 0}
    with atomic_path(output) as tmp, tmp.open("w") as fh:
        for answer in answers:
            counts[answer["strategy"]] += 1
            fh.write(json.dumps(answer) + "\n")
    return counts
