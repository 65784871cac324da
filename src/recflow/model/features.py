"""Features: the encoded interaction log, its temporal split, and the confidence matrix.

The features stage turns the event store into integer-coded interactions (one row per event, sorted by
time) with id maps and a split label per event:

    FIT         the oldest events: what the ranker's candidate model and the ALS tuning train on
    VALIDATION  the window after FIT: the ranker's labels and the tuning's validation targets
    TEST        the newest events: held out for offline evaluation only

With `global_time` the windows are cut at time quantiles shared by all users (train on the past, test on
the future); with `per_user` each user's last events form that user's windows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from recflow.config import Settings, SplitSettings
from recflow.constants import ACTION, ITEM_ID, ITEM_IDX, TIMESTAMP, USER_ID, USER_IDX
from recflow.errors import EmptyDataError, ModelNotFoundError, UnknownActionError
from recflow.files import atomic_path

logger = logging.getLogger(__name__)

SPLIT_FIT, SPLIT_VALIDATION, SPLIT_TEST = 0, 1, 2
PRODUCTION = 3  # the window after all data: everything is history
SECONDS_PER_DAY = 86_400.0

INTERACTIONS_FILE = "interactions.parquet"
USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"
META_FILE = "meta.json"
PROFILE_FILE = "profile.json"  # the data profile (profile.py), also in meta.json


@dataclass(frozen=True)
class Interactions:
    """Integer-coded events sorted by time; `user_ids[user_idx]` and `item_ids[item_idx]` give the ids back."""

    user_idx: np.ndarray  # int32
    item_idx: np.ndarray  # int32
    action_idx: np.ndarray  # int8, index into `actions`
    ts: np.ndarray  # int64, seconds since the epoch (UTC)
    split: np.ndarray  # int8, SPLIT_*
    user_ids: np.ndarray  # object (str)
    item_ids: np.ndarray  # object (str)
    actions: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.user_idx)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def where(self, mask: np.ndarray) -> Interactions:
        """The events where mask is true, with the same id maps (so indices stay comparable)."""
        return Interactions(
            self.user_idx[mask],
            self.item_idx[mask],
            self.action_idx[mask],
            self.ts[mask],
            self.split[mask],
            self.user_ids,
            self.item_ids,
            self.actions,
        )

    def of_users(self, users: np.ndarray) -> Interactions:
        """The events of `users` (sorted user indices), re-indexed 0..len(users)-1: a sample as small as it is,
        not as wide as the data it was drawn from (`user_ids` are the sample's, item indices unchanged)."""
        position = np.full(self.n_users, -1, dtype=np.int64)
        position[users] = np.arange(len(users))
        mine = position[self.user_idx]
        keep = mine >= 0
        return Interactions(
            mine[keep].astype(self.user_idx.dtype),
            self.item_idx[keep],
            self.action_idx[keep],
            self.ts[keep],
            self.split[keep],
            self.user_ids[users],
            self.item_ids,
            self.actions,
        )

    def before(self, split: int) -> Interactions:
        """History for a window: every event in an earlier split."""
        return self.where(self.split < split)

    def in_split(self, split: int) -> Interactions:
        return self.where(self.split == split)


@dataclass(frozen=True)
class Window:
    """What a model may learn from (`history`), what it is judged or labelled on (`target`), and when.

    `ref_time[u]` is the moment user u's recommendations are made: the start of the target window for
    a global split, the user's last history event for a per-user split. Time-dependent features and the
    time decay are computed relative to it, so nothing after it leaks in.
    """

    history: Interactions
    target: Interactions
    ref_time: np.ndarray  # float64 seconds, one per user


def encode_events(table: pa.Table, actions: tuple[str, ...]) -> Interactions:
    """Integer-code a store table (user_id, item_id, action, timestamp); ids are numbered by first appearance."""
    if table.num_rows == 0:
        raise EmptyDataError("the event store is empty: ingest events first (recflow ingest FILE)")
    ts_ms = pc.cast(table[TIMESTAMP], pa.int64()).to_numpy()
    order = np.argsort(ts_ms, kind="stable")
    table = table.take(pa.array(order))
    users = pc.dictionary_encode(table[USER_ID]).combine_chunks()
    items = pc.dictionary_encode(table[ITEM_ID]).combine_chunks()
    codes = pc.index_in(table[ACTION], value_set=pa.array(actions, pa.string()))
    if codes.null_count:
        unknown = sorted(pc.unique(pc.filter(table[ACTION], pc.is_null(codes))).to_pylist())
        raise UnknownActionError(
            f"the event store holds action(s) {', '.join(map(repr, unknown))} that params.yaml events.actions "
            f"does not list ({', '.join(actions)}): add them with a weight, or remove those events"
        )
    return Interactions(
        user_idx=users.indices.to_numpy().astype(np.int32),
        item_idx=items.indices.to_numpy().astype(np.int32),
        action_idx=codes.to_numpy().astype(np.int8),
        ts=ts_ms[order] // 1000,
        split=np.zeros(table.num_rows, dtype=np.int8),
        user_ids=np.asarray(users.dictionary.to_pylist(), dtype=object),
        item_ids=np.asarray(items.dictionary.to_pylist(), dtype=object),
        actions=tuple(actions),
    )


def assign_split(inter: Interactions, split: SplitSettings) -> tuple[np.ndarray, dict[str, float]]:
    """Label each event FIT / VALIDATION / TEST; returns the labels and the cut times (global split).

    global_time: the windows are cut at time quantiles shared by all users. per_user: each user's last events
    (a share of them, at least one for a user with two or more). random: a random share of each user's events
    (seeded), for data whose timestamps say nothing. `auto` must be resolved first (`resolve_method`).
    """
    labels = np.full(len(inter), SPLIT_FIT, dtype=np.int8)
    cuts: dict[str, float] = {}
    if split.method == "global_time":
        test_start = float(np.quantile(inter.ts, 1.0 - split.test_fraction, method="higher"))
        labels[inter.ts >= test_start] = SPLIT_TEST
        before = inter.ts[inter.ts < test_start]
        if len(before) == 0:
            raise EmptyDataError(
                "every event falls into the test window: the events span too little time for a time split; "
                "lower features.split.test_fraction or use features.split.method: per_user"
            )
        validation_start = float(np.quantile(before, 1.0 - split.validation_fraction, method="higher"))
        labels[(inter.ts >= validation_start) & (inter.ts < test_start)] = SPLIT_VALIDATION
        cuts = {"validation_start": validation_start, "test_start": test_start}
        return labels, cuts
    if split.method == "random":
        rank = np.random.default_rng(split.seed).random(len(inter))
        order = np.lexsort((rank, inter.user_idx))  # each user's events in a random order
    elif split.method == "per_user":
        order = np.argsort(inter.user_idx, kind="stable")  # events are sorted by time: each user's in time order
    else:
        raise ValueError(f"split method {split.method!r} must be resolved first (resolve_method)")
    users = inter.user_idx[order]
    counts = np.bincount(users, minlength=inter.n_users)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    position = np.arange(len(order)) - starts[users]
    n_test = _held_out(counts, split.test_fraction)
    n_validation = _held_out(counts - n_test, split.validation_fraction)
    from_end = counts[users] - position  # 1 for a user's last event
    sorted_labels = np.where(
        from_end <= n_test[users],
        SPLIT_TEST,
        np.where(from_end <= n_test[users] + n_validation[users], SPLIT_VALIDATION, SPLIT_FIT),
    )
    labels[order] = sorted_labels
    return labels, cuts


def _held_out(counts: np.ndarray, fraction: float) -> np.ndarray:
    """Events held out per user: the share rounded, at least one for a user with two or more events."""
    if fraction <= 0:
        return np.zeros(len(counts), dtype=np.int64)
    return np.where(counts >= 2, np.clip(np.rint(counts * fraction), 1, counts - 1), 0).astype(np.int64)


def resolve_method(method: str, time_informative: bool) -> str:
    """`auto`: each user's last events when timestamps carry information, a random share when they do not."""
    if method != "auto":
        return method
    return "per_user" if time_informative else "random"


def window(inter: Interactions, target_split: int, method: str, cuts: dict[str, float]) -> Window:
    """History = events of earlier splits; target = events of `target_split` (none past the last split).

    The moment the recommendations are made is the end of the history: the cut for a global split, the last
    history event (+1 s) otherwise, as `recflow recommend` answers as of the end of the data it was trained on.
    """
    history = inter.before(target_split)
    target = inter.in_split(target_split)
    if len(history) == 0:
        raise EmptyDataError("no events before the target window: the data set is too small to split")
    if method == "global_time" and target_split <= SPLIT_TEST:
        moment = cuts["validation_start" if target_split == SPLIT_VALIDATION else "test_start"]
    else:
        moment = float(history.ts.max()) + 1.0
    return Window(history=history, target=target, ref_time=np.full(inter.n_users, moment, dtype=np.float64))


def last_event_times(inter: Interactions, n_users: int | None = None) -> np.ndarray:
    """Each user's last event time (seconds), -inf for a user without events."""
    last = np.full(n_users or inter.n_users, -np.inf)
    np.maximum.at(last, inter.user_idx, inter.ts.astype(np.float64))
    return last


def decay(age_seconds: np.ndarray, half_life_days: float | None) -> np.ndarray:
    """Weight of an event `age_seconds` before its user's last event: 2^(-age / half-life); 1 without decay."""
    if not half_life_days:
        return np.ones(len(age_seconds))
    return np.asarray(np.exp2(-np.maximum(age_seconds, 0.0) / (half_life_days * SECONDS_PER_DAY)), dtype=np.float64)


def confidence_matrix(
    inter: Interactions,
    weights: np.ndarray,
    half_life_days: float | None,
    n_users: int | None = None,
    *,
    anchor: np.ndarray | None = None,
) -> sp.csr_matrix:
    """Users x items matrix of summed action weight x time decay.

    The decay is measured back from each user's own last event (`anchor`, default: the last event in `inter`),
    not from a global "now": a user who has been away keeps the shape of their history, and the row does not
    depend on when it is asked for. `half_life_days` 0 or None: no decay.
    """
    n = n_users or inter.n_users
    anchor = last_event_times(inter, n) if anchor is None else anchor
    age = anchor[inter.user_idx] - inter.ts if len(inter) else np.zeros(0)
    values = weights[inter.action_idx] * decay(age, half_life_days)
    matrix = sp.csr_matrix((values.astype(np.float32), (inter.user_idx, inter.item_idx)), shape=(n, inter.n_items))
    matrix.sum_duplicates()
    return matrix


def action_weights(settings: Settings, actions: tuple[str, ...]) -> np.ndarray:
    return np.array([settings.events.actions[a] for a in actions], dtype=np.float64)


@dataclass(frozen=True)
class FeatureSummary:
    events: int
    users: int
    items: int
    fit: int
    validation: int
    test: int
    method: str


def build_features(store: Path, out: Path, settings: Settings) -> FeatureSummary:
    """The features stage: read the store, encode, split, and write `out/` atomically."""
    from recflow.store.eventstore import scan_store

    table = scan_store(store, columns=[USER_ID, ITEM_ID, ACTION, TIMESTAMP])
    inter = encode_events(table, tuple(settings.events.actions))
    from recflow.model.profile import profile_interactions

    profile = profile_interactions(inter)
    method = resolve_method(settings.features.split.method, profile.time_informative)
    labels, cuts = assign_split(inter, dataclasses.replace(settings.features.split, method=method))
    inter = Interactions(**{**inter.__dict__, "split": labels})
    counts = np.bincount(labels, minlength=3)
    summary = FeatureSummary(
        events=len(inter),
        users=inter.n_users,
        items=inter.n_items,
        fit=int(counts[SPLIT_FIT]),
        validation=int(counts[SPLIT_VALIDATION]),
        test=int(counts[SPLIT_TEST]),
        method=method,
    )
    if min(summary.fit, summary.validation, summary.test) == 0:
        raise EmptyDataError(
            f"the split left an empty window (fit={summary.fit}, validation={summary.validation}, "
            f"test={summary.test}); the store needs more events per user or over time"
        )
    meta: dict[str, Any] = {
        "actions": list(inter.actions),
        "cuts": cuts,
        "summary": summary.__dict__,
        "profile": profile.as_dict(),
    }
    save_interactions(inter, out, meta)
    with atomic_path(out / PROFILE_FILE) as tmp:
        tmp.write_text(json.dumps(profile.as_dict(), indent=2))
    logger.info("features: %d events, %d users, %d items", summary.events, summary.users, summary.items)
    return summary


def save_interactions(inter: Interactions, out: Path, meta: dict[str, object]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tables = {
        INTERACTIONS_FILE: pa.table(
            {
                USER_IDX: inter.user_idx,
                ITEM_IDX: inter.item_idx,
                "action_idx": inter.action_idx,
                "ts": inter.ts,
                "split": inter.split,
            }
        ),
        USERS_FILE: pa.table({USER_ID: pa.array(inter.user_ids, pa.string())}),
        ITEMS_FILE: pa.table({ITEM_ID: pa.array(inter.item_ids, pa.string())}),
    }
    for name, table in tables.items():
        with atomic_path(out / name) as tmp:
            pq.write_table(table, tmp)
    with atomic_path(out / META_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))


def load_interactions(features: Path) -> tuple[Interactions, dict[str, Any]]:
    if not (features / INTERACTIONS_FILE).exists():
        raise ModelNotFoundError(f"no features in {features}: run `recflow features` (or dvc repro) first")
    table = pq.read_table(features / INTERACTIONS_FILE)
    meta = json.loads((features / META_FILE).read_text())
    inter = Interactions(
        user_idx=table[USER_IDX].to_numpy(),
        item_idx=table[ITEM_IDX].to_numpy(),
        action_idx=table["action_idx"].to_numpy(),
        ts=table["ts"].to_numpy(),
        split=table["split"].to_numpy(),
        user_ids=np.asarray(pq.read_table(features / USERS_FILE)[USER_ID].to_pylist(), dtype=object),
        item_ids=np.asarray(pq.read_table(features / ITEMS_FILE)[ITEM_ID].to_pylist(), dtype=object),
        actions=tuple(meta["actions"]),
    )
    return inter, meta
