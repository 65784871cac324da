"""Batch recommendations: read user ids, answer from the deployable bundle as of a moment, write JSONL.

The moment (`recflow recommend --as-of`): by default the end of the data the model was trained on; one time for
everyone; each user's last event (`last-event`); or a per-user `as_of` column of the users file. As of an
earlier moment, each user's row, ALS vector (re-solved against the trained item factors) and ranker features
count only the user's events before it, and popularity and the ranker's item statistics only events before the
latest requested moment; the item factors and item-item weights stay as trained.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.csv as pacsv

from recflow.config import RankerSettings
from recflow.constants import USER_ID
from recflow.errors import InputFileError, ModelNotFoundError
from recflow.files import atomic_path
from recflow.model.bundle import ModelBundle
from recflow.model.features import confidence_matrix
from recflow.model.metrics import PAD
from recflow.model.ranker_features import build_context
from recflow.model.scoring import score_users
from recflow.model.selection import popularity_as_of
from recflow.model.training import BUNDLE_DIR

AS_OF_COLUMN = "as_of"
LAST_EVENT = "last-event"
FROM_FILE = "column"


def _column(path: Path, name: str, hint: str) -> list[object]:
    """One column of a CSV file, or one key of each object of a JSONL file (lines in order)."""
    if path.suffix == ".csv":
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={name: "string"}))
        if name not in table.column_names:
            raise InputFileError(f"{path} has no {name} column ({hint}; columns: {', '.join(table.column_names)})")
        return list(table[name].to_pylist())
    values: list[object] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line)[name])
        except (ValueError, KeyError, TypeError) as exc:
            raise InputFileError(f"{path} line {number}: expected an object with {name} ({exc})") from None
    return values


def read_user_ids(path: Path) -> list[str]:
    """User ids from a text file (one per line), a CSV with a user_id column, or JSONL objects with user_id."""
    if not path.exists():
        raise InputFileError(f"user file {path} does not exist")
    if path.suffix in (".csv", ".jsonl", ".json"):
        ids = _column(path, USER_ID, "one id per user")
    else:
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids or any(i is None or i == "" for i in ids):
        raise InputFileError(f"{path} holds no user ids, or an empty one: give one non-empty id per line")
    return [str(i) for i in ids]


def parse_moment(text: str) -> float:
    """Epoch seconds of an ISO-8601 time (with offset; Z allowed) or of epoch seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputFileError(
            f"--as-of {text!r} is not a time: give ISO-8601 with an offset (2024-05-01T12:00:00Z), epoch seconds, "
            f"{LAST_EVENT}, or {FROM_FILE} (an {AS_OF_COLUMN} column in the users file)"
        ) from None
    if parsed.tzinfo is None:
        raise InputFileError(f"--as-of {text!r} has no UTC offset: add one (e.g. Z or +02:00)")
    return parsed.timestamp()


def read_moments(path: Path) -> list[float]:
    """The `as_of` column of a CSV or JSONL users file, in the order of `read_user_ids`."""
    if path.suffix not in (".csv", ".jsonl", ".json"):
        raise InputFileError(f"--as-of {FROM_FILE} needs a CSV or JSONL users file with an {AS_OF_COLUMN} column")
    values = _column(path, AS_OF_COLUMN, f"--as-of {FROM_FILE} reads one per user")
    if any(v is None or v == "" for v in values):
        raise InputFileError(f"{path}: every user needs an {AS_OF_COLUMN} value")
    return [parse_moment(str(v)) for v in values]


def recommend_as_of(bundle: ModelBundle, user_ids: list[str], k: int, moments: np.ndarray) -> list[dict[str, Any]]:
    """`recommend_ids` as of a moment per user (NaN: the bundle's own moment; see the module docstring)."""
    events = bundle.events
    if events is None:
        raise ModelNotFoundError("this model was trained without its event history: retrain to answer --as-of")
    index = np.asarray([bundle.user_index.get(u, -1) for u in user_ids], dtype=np.int64)
    moments = np.where(np.isnan(moments), bundle.moment, moments)
    known = index >= 0
    latest = float(moments.max()) if len(moments) else bundle.moment
    per_user = np.full(len(bundle.user_ids), latest)
    per_user[index[known]] = moments[known]  # a user asked for twice takes the last moment given
    history = events.where(events.ts < per_user[events.user_idx])
    rows = confidence_matrix(history, bundle.action_weights, bundle.half_life_days, len(bundle.user_ids))
    windows = float(bundle.info.get("popularity_window_days", 0.0))
    view = dataclasses.replace(bundle, popularity=popularity_as_of(history, bundle.action_weights, latest, windows))
    ctx = bundle.context
    ranker_settings = RankerSettings(popularity_windows_days=ctx.windows_days, recent_items=ctx.recent_items.shape[1])
    context = build_context(history, per_user, bundle.item_factors, ranker_settings)
    users = index[known]
    has_history = np.diff(rows.indptr)[users] > 0
    personal = users[has_history]
    items, scores = score_users(
        view,
        rows[personal],
        k,
        vectors=view.solve(rows[personal]),
        rerank_fn=view.rerank_fn(personal, context=context) if view.ranker is not None else None,
    )
    top = view.popular_order[:k]  # the popular fallback, as of the moment, for users without history then
    by_user = {int(u): j for j, u in enumerate(personal)}
    out = []
    for user_id, i in zip(user_ids, index, strict=True):
        if int(i) in by_user:
            row = by_user[int(i)]
            keep = items[row] != PAD
            chosen, chosen_scores, strategy = items[row][keep], scores[row][keep], "personalized"
        else:
            chosen, chosen_scores, strategy = top, view.popularity[top], "popular"
        out.append(
            {
                "user_id": user_id,
                "items": [str(x) for x in bundle.item_ids[chosen]],
                "scores": [round(float(s), 6) for s in chosen_scores],
                "strategy": strategy,
            }
        )
    return out


def write_recommendations(
    models: Path, user_ids: list[str], k: int, output: Path, *, as_of: str | None = None, users_file: Path | None = None
) -> dict[str, int]:
    """Write one line per user: {"user_id", "items", "scores", "strategy"}; returns counts per strategy.
    `as_of`: None (the end of the training data), a time, `last-event`, or `column` (see the module docstring)."""
    bundle = ModelBundle.load(models / BUNDLE_DIR)
    if as_of is None:
        answers = bundle.recommend_ids(user_ids, k)
    else:
        if as_of == LAST_EVENT:
            index = np.asarray([bundle.user_index.get(u, -1) for u in user_ids], dtype=np.int64)
            last = bundle.context.user_last_ts
            moments = np.where(index >= 0, last[np.maximum(index, 0)] + 1.0, np.nan)
        elif as_of == FROM_FILE:
            if users_file is None:
                raise InputFileError(f"--as-of {FROM_FILE} reads the users file's {AS_OF_COLUMN} column")
            moments = np.asarray(read_moments(users_file), dtype=np.float64)
        else:
            moments = np.full(len(user_ids), parse_moment(as_of))
        answers = recommend_as_of(bundle, user_ids, k, moments)
    counts = {"personalized": 0, "popular": 0}
    with atomic_path(output) as tmp, tmp.open("w") as fh:
        for answer in answers:
            counts[answer["strategy"]] += 1
            fh.write(json.dumps(answer) + "\n")
    return counts
