"""The data profile: the shape of an event history, which the train stage's choices refer to.

Written by the features stage (`features/profile.json`) and printed by `recflow profile`. The one decision it
makes itself is whether timestamps carry information: when they do not (every event at one time, or most of
them at one import time), a time split means nothing and validation holds out a random share of each user's
events instead (`validation_protocols`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from recflow.model.features import SECONDS_PER_DAY, Interactions

PROTOCOL_GLOBAL = "global_time"  # train on the past, predict every user's future after one cut
PROTOCOL_USER = "user_last"  # each user's last events held out
PROTOCOL_RANDOM = "user_random"  # a random share of each user's events held out (no usable time)

SESSION_GAP_SECONDS = 30 * 60  # consecutive events of a user closer than this belong to one session
IMPORT_TIME_SHARE = 0.5  # more than this share of events at one timestamp: an import time, not event time


@dataclass(frozen=True)
class DataProfile:
    events: int
    users: int
    items: int
    span_days: float
    distinct_timestamps: int
    top_timestamp_share: float  # share of events at the most frequent timestamp
    time_informative: bool
    events_per_user_median: float
    events_per_user_p90: float
    one_event_user_share: float
    items_per_user_median: float
    session_gap_share: float  # share of a user's consecutive events within SESSION_GAP_SECONDS
    density: float  # distinct (user, item) pairs / (users x items)

    @property
    def protocols(self) -> tuple[str, ...]:
        return validation_protocols(self)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "validation_protocols": list(self.protocols)}


def validation_protocols(profile: DataProfile) -> tuple[str, ...]:
    """How validation folds are cut: by time (globally and per user) when timestamps carry information,
    at random per user when they do not."""
    if not profile.time_informative:
        return (PROTOCOL_RANDOM,)
    return (PROTOCOL_GLOBAL, PROTOCOL_USER)


def profile_interactions(inter: Interactions) -> DataProfile:
    n = len(inter)
    ts = inter.ts
    _, ts_counts = np.unique(ts, return_counts=True)
    top_share = float(ts_counts.max() / n) if n else 1.0
    per_user = np.bincount(inter.user_idx, minlength=inter.n_users)
    per_user = per_user[per_user > 0]
    pairs = np.unique(inter.user_idx.astype(np.int64) * inter.n_items + inter.item_idx)
    items_per_user = np.bincount((pairs // inter.n_items).astype(np.int64), minlength=inter.n_users)
    order = np.lexsort((ts, inter.user_idx))
    same_user = inter.user_idx[order][1:] == inter.user_idx[order][:-1]
    gaps = np.diff(ts[order])[same_user]
    span = float(ts.max() - ts.min()) / SECONDS_PER_DAY if n else 0.0
    informative = len(ts_counts) > 1 and top_share <= IMPORT_TIME_SHARE and span > 0
    return DataProfile(
        events=n,
        users=len(per_user),
        items=int(inter.n_items),
        span_days=round(span, 3),
        distinct_timestamps=len(ts_counts),
        top_timestamp_share=round(top_share, 4),
        time_informative=bool(informative),
        events_per_user_median=float(np.median(per_user)) if len(per_user) else 0.0,
        events_per_user_p90=float(np.percentile(per_user, 90)) if len(per_user) else 0.0,
        one_event_user_share=round(float(np.mean(per_user == 1)) if len(per_user) else 0.0, 4),
        items_per_user_median=float(np.median(items_per_user[items_per_user > 0])) if len(pairs) else 0.0,
        session_gap_share=round(float(np.mean(gaps <= SESSION_GAP_SECONDS)) if len(gaps) else 0.0, 4),
        density=float(len(pairs) / max(inter.n_users * inter.n_items, 1)),
    )
