"""The drift check: does the current window of events (and of ranker inputs) look like the reference window?

Windows, cut back from the store's last event (the data's "now"), lengths in params.yaml `drift`:

    [ reference's lookback ][ gap ][ reference window ][ current window ]
                           [ current's lookback        ]

Each window's new items and users and its popularity buckets are read against its own lookback: the `lookback_days`
that end one reference window (`reference_days`) before it starts. So the current window's lookback ends where the
reference window starts, the two windows stand the same distance from their lookbacks, and neither lookback holds
either window's events: dealing the two windows' users at random (the null, below) leaves both lookbacks as they are.

Three data sets per window, each row belonging to one user (the frames' index):

- events (one row per event): the action, the item's popularity bucket (its share of the events in the window's
  lookback: pop01 = the items that drew the first 1/buckets of those events, ..., "new" = an item without events
  there), whether the item is new, whether the user is new (no events there);
- users (one row per active user): events and distinct items per user in the window;
- candidates (one row per user and candidate): the ranker's features and score for the candidates of active
  users, computed with the trained bundle's own functions (recflow.model.ranker.build_context / candidate_features)
  from the `lookback_days` of events before the window's end. Skipped, with the reason, when no bundle exists.

Each column's distribution in a window weighs every active user the same, and it is tested against a null
distribution made by dealing the two windows' users at random into two groups of the windows' sizes
(recflow.ops.drift_stats), so the verdict holds for a window of 40 users as for one of 40,000. A user dealt to the
other window is read against that window's lookback (FramePair.reference_as_current / current_as_reference): two
lookbacks differ by sampling alone (which items their users happened to rate), and the null must hold that difference
as the observed distance does, or it flags it. A column drifts when it is significant (min-p adjusted p-value below
`alpha`, split over the data sets) and moved at least its data set's `min_effect`. Windows with fewer than
`min_users` users or `min_events` events get the verdict "not enough data" with their sizes. Evidently's ValueDrift
describes the flagged columns (evidently_detail; drift_report saves it).

Every aggregate is defined the same way relative to its own window, so two windows of one distribution give
the same distributions; windows of equal length (the default) keep even the length-dependent ones (new items,
events per user) comparable.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from recflow.config import Settings
from recflow.constants import ACTION, ITEM_ID, TIMESTAMP, USER_ID
from recflow.errors import EmptyDataError, ModelNotFoundError
from recflow.ops.drift_stats import ColumnDrift, permutation_test

logger = logging.getLogger(__name__)

EVENTS, USERS, CANDIDATES = "events", "users", "candidates"
DRIFT, NO_DRIFT, NOT_ENOUGH_DATA = "drift", "no drift", "not enough data"
SCORE = "ranker_score"
NEW = "new"
_DAY_MS = 86_400_000


@dataclass(frozen=True)
class DriftWindows:
    lookback_start: datetime  # the reference window's lookback starts here (the oldest event read)
    reference_start: datetime
    current_start: datetime  # = the reference window's end
    end: datetime  # exclusive: just after the last stored event

    def as_dict(self) -> dict[str, str]:
        return {k: v.isoformat(timespec="seconds") for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class FramePair:
    """One data set's rows in the reference and the current window (each frame's index names the user of its rows).

    For columns read against a window's own lookback (events: item_popularity, new_item, new_user), the same rows as
    the other window reads them: the null deals rows between the windows with the value of the window they land in.
    None: every column reads the same in both windows."""

    reference: pd.DataFrame
    current: pd.DataFrame
    reference_as_current: pd.DataFrame | None = None  # the reference rows read against the current window's lookback
    current_as_reference: pd.DataFrame | None = None  # the current rows read against the reference window's lookback

    def window(self, label: str) -> pd.DataFrame:
        """The "reference" or the "current" frame."""
        return {"reference": self.reference, "current": self.current}[label]


Frames = dict[str, FramePair]  # data set -> its rows in the two windows


@dataclass(frozen=True)
class DatasetDrift:
    name: str
    reference_rows: int
    current_rows: int
    reference_users: int
    current_users: int
    alpha: float  # the data set's share of the check's family-wise false-alarm rate
    drifted: bool  # any column drifted
    columns: list[ColumnDrift]


@dataclass
class DriftResult:
    status: str  # DRIFT, NO_DRIFT or NOT_ENOUGH_DATA
    reasons: list[str]  # why drift was flagged, or why there was not enough data (empty: no drift)
    windows: DriftWindows
    sizes: dict[str, dict[str, int]]  # "reference"/"current" -> {"users": ..., "events": ...}
    datasets: list[DatasetDrift]
    skipped: dict[str, str]  # data set -> why it was not compared
    aggregates: dict[str, dict[str, float]]  # "reference"/"current" -> readable window aggregates
    checked_at: str
    html_path: Path | None = None
    json_path: Path | None = None
    evidently_path: Path | None = None  # Evidently's snapshot of the drifted columns (None: none drifted)
    evidently: Any = field(default=None, repr=False)  # Evidently's report of the drifted columns (None: none)

    @property
    def drifted(self) -> bool:
        return self.status == DRIFT

    def flagged(self) -> list[tuple[str, ColumnDrift]]:
        """(data set, column) of every drifted column."""
        return [(d.name, c) for d in self.datasets for c in d.columns if c.drifted]

    def summary(self) -> dict[str, Any]:
        """The JSON summary written next to the HTML report."""
        return {
            "checked_at": self.checked_at,
            "status": self.status,
            "drifted": self.drifted,
            "reasons": self.reasons,
            "windows": self.windows.as_dict(),
            "sizes": self.sizes,
            "aggregates": self.aggregates,
            "datasets": [dataclasses.asdict(d) for d in self.datasets],
            "skipped": self.skipped,
            "html": None if self.html_path is None else str(self.html_path),
            "evidently": None if self.evidently_path is None else str(self.evidently_path),
        }


def drift_windows(last_event: datetime, settings: Settings) -> DriftWindows:
    conf = settings.drift
    end = last_event + timedelta(milliseconds=1)
    current_start = end - timedelta(days=conf.current_days)
    reference_start = current_start - timedelta(days=conf.reference_days)
    lookback_start = reference_start - timedelta(days=conf.reference_days + conf.lookback_days)
    return DriftWindows(lookback_start, reference_start, current_start, end)


def load_events(store: Path, settings: Settings, *, end: datetime | None = None) -> tuple[pd.DataFrame, DriftWindows]:
    """The events the check reads (from the reference window's lookback to `end`, default: the last event),
    as a frame with user_id, item_id, action (categories) and ts (int64 ms), sorted by time."""
    from recflow.store.eventstore import scan_store, store_span

    span = store_span(store)  # read from the first and last partitions only
    if span is None:
        raise EmptyDataError(f"the event store {store} is empty: ingest events first (recflow ingest FILE)")
    first, last = span
    windows = drift_windows(min(end, last) if end else last, settings)
    if first > windows.lookback_start:
        days = (windows.end - first).total_seconds() / 86_400
        conf = settings.drift
        raise EmptyDataError(
            f"the store spans {days:.1f} days, the drift check needs lookback + gap + reference + current = "
            f"{conf.lookback_days:g} + {conf.reference_days:g} + {conf.reference_days:g} + {conf.current_days:g} days "
            "(params.yaml drift.*_days; the gap between the reference window and its lookback is one reference "
            "window): shorten them or wait for more events"
        )
    table = scan_store(
        store, columns=[USER_ID, ITEM_ID, ACTION, TIMESTAMP], start=windows.lookback_start, end=windows.end
    )
    ts = pc.cast(table[TIMESTAMP], "int64")
    start_ms, end_ms = _ms(windows.lookback_start), _ms(windows.end)
    table = table.filter(pc.and_(pc.greater_equal(ts, start_ms), pc.less(ts, end_ms)))
    frame = pd.DataFrame(
        {
            USER_ID: table[USER_ID].to_pandas().astype("category"),
            ITEM_ID: table[ITEM_ID].to_pandas().astype("category"),
            ACTION: table[ACTION].to_pandas().astype("category"),
            "ts": pc.cast(table[TIMESTAMP], "int64").to_numpy(),
        }
    )
    return frame.sort_values("ts", kind="stable", ignore_index=True), windows


def event_frames(events: pd.DataFrame, windows: DriftWindows, settings: Settings) -> Frames:
    """{events, users} -> the per-event and per-user aggregates of the two windows; each frame's index is the user of
    its rows. The events' lookback columns are also read against the other window's lookback (FramePair)."""
    conf = settings.drift
    lookback_ms, gap_ms = round(conf.lookback_days * _DAY_MS), round(conf.reference_days * _DAY_MS)
    ts = events["ts"].to_numpy()
    inside, lookbacks, users = [], [], []
    for start, stop in ((windows.reference_start, windows.current_start), (windows.current_start, windows.end)):
        s, e = _ms(start), _ms(stop)
        rows = events[(ts >= s) & (ts < e)]
        before = events[(ts >= s - gap_ms - lookback_ms) & (ts < s - gap_ms)]
        inside.append(rows)
        lookbacks.append(
            (_popularity_buckets(before[ITEM_ID], conf.popularity_buckets), set(before[USER_ID].astype(str).unique()))
        )
        per_user = rows.groupby(USER_ID, observed=True).agg(events=(ITEM_ID, "size"), items=(ITEM_ID, "nunique"))
        per_user.index = per_user.index.astype(str)
        users.append(per_user.astype(np.float64))
    (ref, cur), (ref_lookback, cur_lookback) = inside, lookbacks
    return {
        EVENTS: FramePair(
            reference=_read(ref, *ref_lookback).assign(action=ref[ACTION].astype(str).to_numpy())[_EVENT_COLUMNS],
            current=_read(cur, *cur_lookback).assign(action=cur[ACTION].astype(str).to_numpy())[_EVENT_COLUMNS],
            reference_as_current=_read(ref, *cur_lookback),
            current_as_reference=_read(cur, *ref_lookback),
        ),
        USERS: FramePair(users[0], users[1]),
    }


_EVENT_COLUMNS = ["action", "item_popularity", "new_item", "new_user"]


def _read(rows: pd.DataFrame, bucket: dict[str, str], seen_users: set[str]) -> pd.DataFrame:
    """The events' columns read against one lookback (its items' popularity buckets, its users), indexed by user."""
    item_bucket = rows[ITEM_ID].astype(str).map(bucket).fillna(NEW).to_numpy()
    return pd.DataFrame(
        {
            "item_popularity": item_bucket,
            "new_item": np.where(item_bucket == NEW, "yes", "no"),
            "new_user": np.where(rows[USER_ID].astype(str).isin(seen_users).to_numpy(), "no", "yes"),
        },
        index=pd.Index(rows[USER_ID].astype(str).to_numpy(), name=USER_ID),
    )


def _popularity_buckets(items: pd.Series, buckets: int) -> dict[str, str]:
    """item -> "popNN": bucket k holds the items that drew the k-th 1/buckets of the events (most popular first)."""
    counts = items.value_counts(sort=True)
    counts = counts[counts > 0]
    if counts.empty:
        return {}
    before = (counts.cumsum() - counts) / counts.sum()
    index = np.minimum((before.to_numpy() * buckets).astype(int), buckets - 1)
    return dict(zip(counts.index.astype(str), (f"pop{i + 1:02d}" for i in index), strict=True))


def candidate_frames(bundle_dir: Path, events: pd.DataFrame, windows: DriftWindows, settings: Settings) -> FramePair:
    """The ranker's features and score for the candidates of each window's active users (reference, current),
    indexed by the user.

    Each window's feature context is built by recflow.model.ranker from the `lookback_days` of events before the
    window's end, encoded with the bundle's id maps (events of users or items the bundle does not know cannot
    reach its factors and are left out); candidates come from the bundle's own generator.
    """
    from recflow.model.bundle import ModelBundle
    from recflow.model.features import Interactions
    from recflow.model.ranker_features import build_context, candidate_features, feature_names

    bundle = ModelBundle.load(bundle_dir)
    conf = settings.drift
    ranker_conf = dataclasses.replace(
        settings.ranker,
        popularity_windows_days=bundle.context.windows_days,
        recent_items=bundle.context.recent_items.shape[1],
    )
    names = feature_names(bundle.actions, bundle.context.windows_days)
    user_pos = pd.Index(bundle.user_ids).get_indexer(pd.Index(events[USER_ID].astype(str)))
    item_pos = pd.Index(bundle.item_ids).get_indexer(pd.Index(events[ITEM_ID].astype(str)))
    action_pos = pd.Index(list(bundle.actions)).get_indexer(pd.Index(events[ACTION].astype(str)))
    ts = events["ts"].to_numpy()
    known = (user_pos >= 0) & (item_pos >= 0) & (action_pos >= 0)
    rng = np.random.default_rng(conf.seed)
    out = []
    for start, stop in ((windows.reference_start, windows.current_start), (windows.current_start, windows.end)):
        s, e = _ms(start), _ms(stop)
        rows = known & (ts >= e - round(conf.lookback_days * _DAY_MS)) & (ts < e)
        history = Interactions(
            user_idx=user_pos[rows].astype(np.int32),
            item_idx=item_pos[rows].astype(np.int32),
            action_idx=action_pos[rows].astype(np.int8),
            ts=ts[rows] // 1000,
            split=np.zeros(int(rows.sum()), dtype=np.int8),
            user_ids=bundle.user_ids,
            item_ids=bundle.item_ids,
            actions=bundle.actions,
        )
        ref_time = np.full(len(bundle.user_ids), e / 1000.0)
        context = build_context(history, ref_time, bundle.item_factors, ranker_conf)
        active = np.unique(user_pos[known & (ts >= s) & (ts < e)])
        if len(active) == 0:
            raise EmptyDataError(f"no user active in {start:%Y-%m-%d} .. {stop:%Y-%m-%d} is known to the model")
        if len(active) > conf.candidate_users:
            active = np.sort(rng.choice(active, conf.candidate_users, replace=False))
        candidates = bundle.candidate_set(active)
        X, row_user, _ = candidate_features(context, active, candidates)
        frame = pd.DataFrame(X.astype(np.float64), columns=names, index=pd.Index(row_user, name=USER_ID))
        if bundle.ranker is not None:
            frame[SCORE] = bundle.ranker.predict(X, num_iteration=bundle.ranker.best_iteration or None)
        out.append(frame)
    return FramePair(out[0], out[1])


def compare(frames: Frames, settings: Settings) -> list[DatasetDrift]:
    """Test every column of each data set's two windows against its permutation null (recflow.ops.drift_stats).
    The check's false-alarm rate `alpha` is split evenly over the data sets."""
    conf = settings.drift
    alpha = conf.alpha / max(len(frames), 1)
    results = []
    for name, pair in frames.items():
        reference, current = pair.reference, pair.current
        check = getattr(conf, name)
        floors = {c: check.per_column_min_effect.get(c, check.min_effect) for c in reference.columns}
        columns = permutation_test(
            reference,
            current,
            alpha=alpha,
            min_effect=floors,
            permutations=conf.permutations,
            bins=conf.bins,
            seed=conf.seed,
            reference_as_current=pair.reference_as_current,
            current_as_reference=pair.current_as_reference,
        )
        drifted = any(c.drifted for c in columns)
        users = (reference.index.nunique(), current.index.nunique())
        results.append(DatasetDrift(name, len(reference), len(current), *users, round(alpha, 6), drifted, columns))
    return results


def evidently_detail(frames: Frames, datasets: list[DatasetDrift], settings: Settings) -> Any | None:
    """One Evidently report of ValueDrift for the drifted columns only (named `<data set>.<column>`, each on at most
    `max_rows` seeded rows per window that weigh every user the same, as the test does; shorter columns padded with
    missing values, which Evidently leaves out), with the same distance and the threshold this check needed. None
    when no column drifted."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    flagged = [(d.name, c) for d in datasets for c in d.columns if c.drifted]
    if not flagged:
        return None
    windows: tuple[dict[str, pd.Series], dict[str, pd.Series]] = ({}, {})
    for name, column in flagged:
        for position, frame in enumerate((frames[name].reference, frames[name].current)):
            windows[position][f"{name}.{column.column}"] = _sample(frame[[column.column]], settings)[column.column]
    reference, current = (pd.DataFrame(w) for w in windows)
    names = [f"{name}.{c.column}" for name, c in flagged]
    categorical = [f"{name}.{c.column}" for name, c in flagged if c.kind == "categorical"]
    definition = DataDefinition(
        numerical_columns=[n for n in names if n not in categorical], categorical_columns=categorical
    )
    metrics = [
        ValueDrift(column=label, method=c.method, threshold=_evidently_threshold(c, reference[label], current[label]))
        for label, (_, c) in zip(names, flagged, strict=True)
    ]
    return Report(metrics).run(  # current first, reference second
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition),
    )


def _evidently_threshold(column: ColumnDrift, reference: pd.Series, current: pd.Series) -> float:
    """The critical distance in Evidently's units: its Wasserstein is divided by the reference's std, ours by the
    pooled one's."""
    if column.kind == "categorical":
        return column.critical
    pooled = pd.concat([reference, current]).std(ddof=0)
    return column.critical * max(float(pooled), 1e-3) / max(float(reference.std(ddof=0)), 1e-3)


def _sample(frame: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """At most `max_rows` rows in which every user weighs the same, as in the test (recflow.ops.drift_stats): the same
    number of rows drawn from each user's rows (with replacement), then a uniform sample of those when there are
    more users than `max_rows`."""
    conf = settings.drift
    per_user = max(conf.max_rows // max(frame.index.nunique(), 1), 1)
    balanced = frame.groupby(level=0, sort=False).sample(per_user, replace=True, random_state=conf.seed)
    if len(balanced) > conf.max_rows:
        balanced = balanced.sample(conf.max_rows, random_state=conf.seed)
    return balanced.reset_index(drop=True)


def window_sizes(frames: Frames) -> dict[str, dict[str, int]]:
    """Active users and events of each window."""
    return {
        label: {"users": len(frames[USERS].window(label)), "events": len(frames[EVENTS].window(label))}
        for label in ("reference", "current")
    }


def too_small(sizes: dict[str, dict[str, int]], settings: Settings) -> list[str]:
    """Why the windows are too small for a verdict (empty: they are large enough)."""
    conf = settings.drift
    return [
        f"the {label} window holds {size['users']:,} users and {size['events']:,} events; a verdict needs at least "
        f"{conf.min_users:,} users and {conf.min_events:,} events per window (params.yaml drift.min_users, "
        "drift.min_events): lengthen drift.*_days"
        for label, size in sizes.items()
        if size["users"] < conf.min_users or size["events"] < conf.min_events
    ]


def aggregates(frames: Frames) -> dict[str, dict[str, float]]:
    """Readable per-window numbers for the summary: action mix, new-item and new-user shares, activity."""
    out = {}
    for label in ("reference", "current"):
        ev, us = frames[EVENTS].window(label), frames[USERS].window(label)
        mix = ev["action"].value_counts(normalize=True)
        out[label] = {
            "events": float(len(ev)),
            "active_users": float(len(us)),
            **{f"share_{a}": round(float(v), 4) for a, v in mix.sort_index().items()},
            "share_new_items": round(float((ev["new_item"] == "yes").mean()), 4),
            "share_new_users": round(float((ev["new_user"] == "yes").mean()), 4),
            "events_per_user": round(float(us["events"].mean()), 3),
        }
    return out


def verdict(datasets: list[DatasetDrift]) -> list[str]:
    """Why drift is flagged: one reason per drifted data set, naming its drifted columns and how far they moved
    (none: no drift)."""
    return [
        f"{d.name}: "
        + "; ".join(
            f"{c.column} {c.method} {c.score:.3f} (needed {c.critical:.3f}, p={c.p_value:.4f}): "
            f"{c.reference} -> {c.current}"
            for c in d.columns
            if c.drifted
        )
        for d in datasets
        if d.drifted
    ]


def judge(frames: Frames, settings: Settings) -> tuple[str, list[str], list[DatasetDrift]]:
    """The verdict on compared frames: (status, reasons, data sets); "not enough data" when a window is too small."""
    reasons = too_small(window_sizes(frames), settings)
    if reasons:
        logger.info("drift not judged: %s", "; ".join(reasons))
        return NOT_ENOUGH_DATA, reasons, []
    datasets = compare(frames, settings)
    reasons = verdict(datasets)
    return (DRIFT if reasons else NO_DRIFT), reasons, datasets


def check_drift(settings: Settings, *, root: Path = Path("."), end: datetime | None = None) -> DriftResult:
    """The drift stage: read the windows from the store, compare them, return the verdict (nothing written)."""
    from recflow.model.training import BUNDLE_DIR

    paths = settings.paths
    events, windows = load_events(root / paths.store, settings, end=end)
    frames = event_frames(events, windows, settings)
    skipped: dict[str, str] = {}
    try:
        frames[CANDIDATES] = candidate_frames(root / paths.models / BUNDLE_DIR, events, windows, settings)
    except (ModelNotFoundError, EmptyDataError) as exc:
        skipped[CANDIDATES] = str(exc)
        logger.info("ranker distributions not compared: %s", exc)
    status, reasons, datasets = judge(frames, settings)
    detail = evidently_detail(frames, datasets, settings)
    return DriftResult(
        status=status,
        reasons=reasons,
        windows=windows,
        sizes=window_sizes(frames),
        datasets=datasets,
        skipped=skipped,
        aggregates=aggregates(frames),
        checked_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        evidently=detail,
    )


def _ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)
