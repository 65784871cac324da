"""Windows for calibrating the drift check on real events: splits that differ only by sampling, planted drifts of
stated sizes, and a real change (benchmarks/bench_drift_real.py and tests/model/test_drift_real_data.py use them).

A no-drift case takes the events of one span of real time (five weeks of MovieLens ratings, a few days of YooChoose
clicks), deals its users at random into five groups and lays each group's events, time order kept and the span
squeezed, into one slot of five consecutive slots: the reference window's lookback (two slots), the slot between it
and the reference window (the current window's lookback is this slot and the one before), the reference window, the
current window. Nothing then differs between the windows, or between their lookbacks, but which users fell where.
A planted drift changes the current window only, by a stated amount: a share of its events moved to brand-new items,
or to unpopular items, or to another action.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from recflow.config import Settings
from recflow.constants import ACTION, ITEM_ID, TIMESTAMP, USER_ID

SLOTS = 5  # the reference window's lookback (two slots), the slot before the reference window, reference, current
_DAY_MS = 86_400_000


@dataclass(frozen=True)
class Case:
    """Events laid into the four slots, and the settings whose windows are those slots."""

    events: pd.DataFrame  # user_id, item_id, action (categories), ts (int64 ms), sorted by time
    settings: Settings
    end: datetime  # the last event of the current window


def slot_settings(settings: Settings, slot_days: float) -> Settings:
    """The check's settings with windows of one slot and a lookback of two."""
    return settings.replace("drift", current_days=slot_days, reference_days=slot_days, lookback_days=2 * slot_days)


def no_drift_case(
    events: pd.DataFrame,
    start_ms: int,
    span_days: float,
    slot_days: float,
    settings: Settings,
    rng: np.random.Generator,
) -> Case:
    """The users active in [start, start + span) dealt at random into the four slots (their events squeezed into
    the slot in time order)."""
    span = events[(events["ts"] >= start_ms) & (events["ts"] < start_ms + round(span_days * _DAY_MS))]
    users = span[USER_ID].astype(str).unique()
    group = dict(zip(users, rng.permutation(len(users)) % SLOTS, strict=True))
    slot = span[USER_ID].astype(str).map(group).to_numpy()
    return _laid_out(span, slot, start_ms, span_days, slot_days, settings)


def later_case(
    events: pd.DataFrame,
    start_ms: int,
    later_ms: int,
    span_days: float,
    slot_days: float,
    settings: Settings,
    rng: np.random.Generator,
) -> Case:
    """As no_drift_case for the lookback and reference slots, but the current slot holds a random fifth (1/SLOTS) of
    the users active in the span starting at `later_ms` (their events of that later span): a real change of time."""
    base = no_drift_case(events, start_ms, span_days, slot_days, settings, rng)
    kept = base.events[base.events["ts"] < start_ms + (SLOTS - 1) * round(slot_days * _DAY_MS)]
    later = events[(events["ts"] >= later_ms) & (events["ts"] < later_ms + round(span_days * _DAY_MS))]
    users = later[USER_ID].astype(str).unique()
    chosen = rng.permutation(users)[: max(len(users) // SLOTS, 1)]
    later = later[later[USER_ID].astype(str).isin(chosen)]
    current = _laid_out(later, np.full(len(later), SLOTS - 1), later_ms, span_days, slot_days, settings).events
    current = current.assign(ts=current["ts"] - later_ms + start_ms)
    return _case(pd.concat([_plain(kept), _plain(current)], ignore_index=True), start_ms, slot_days, settings)


def _laid_out(
    span: pd.DataFrame, slot: np.ndarray, start_ms: int, span_days: float, slot_days: float, settings: Settings
) -> Case:
    slot_ms = round(slot_days * _DAY_MS)
    offset = (span["ts"].to_numpy() - start_ms) * (slot_days / span_days)
    laid = _plain(span).assign(ts=start_ms + slot * slot_ms + offset.astype(np.int64))
    return _case(laid, start_ms, slot_days, settings)


def _plain(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {c: frame[c].astype(str).to_numpy() for c in (USER_ID, ITEM_ID, ACTION)} | {"ts": frame["ts"].to_numpy()}
    )


def _case(frame: pd.DataFrame, start_ms: int, slot_days: float, settings: Settings) -> Case:
    frame = frame.sort_values("ts", kind="stable", ignore_index=True)
    for column in (USER_ID, ITEM_ID, ACTION):
        frame[column] = frame[column].astype("category")
    end_ms = start_ms + round(SLOTS * slot_days * _DAY_MS) - 1
    return Case(frame, slot_settings(settings, slot_days), datetime.fromtimestamp(end_ms / 1000, UTC))


# --- planted drifts: each changes a stated share of the current window's events ---------------------------------


def current_rows(case: Case) -> np.ndarray:
    start = case.end - timedelta(days=case.settings.drift.current_days) + timedelta(milliseconds=1)
    return np.flatnonzero(case.events["ts"].to_numpy() >= round(start.timestamp() * 1000))


def plant_new_items(case: Case, share: float, rng: np.random.Generator) -> Case:
    """Items of the current window, drawn at random until they hold `share` of its events, become new items (new
    ids: releases the lookback never saw); who acts and how stays the same."""
    rows = current_rows(case)
    items = case.events[ITEM_ID].astype(str).to_numpy()
    counts = pd.Series(items[rows]).value_counts()
    order = counts.index[rng.permutation(len(counts))]
    cumulative = counts[order].cumsum() / len(rows)
    renamed = set(order[: int(np.searchsorted(cumulative.to_numpy(), share)) + 1])
    changed = items.copy()
    hit = rows[np.isin(items[rows], list(renamed))]
    changed[hit] = np.char.add("new-", items[hit].astype(str))
    return _with(case, ITEM_ID, changed)


def plant_popularity_shift(case: Case, share: float, rng: np.random.Generator) -> Case:
    """`share` of the current window's events, drawn at random, move to items of the less popular half (by the
    events before the current window), chosen uniformly: the current window's popularity flattens."""
    rows = current_rows(case)
    items = case.events[ITEM_ID].astype(str).to_numpy()
    before = pd.Series(items[: rows[0]]).value_counts()
    tail = before.index[len(before) // 2 :].to_numpy()
    hit = rng.choice(rows, round(share * len(rows)), replace=False)
    changed = items.copy()
    changed[hit] = rng.choice(tail, len(hit))
    return _with(case, ITEM_ID, changed)


def plant_action_mix(case: Case, share: float, rng: np.random.Generator) -> Case:
    """`share` of the current window's events, drawn at random, take the action that is rarest before the current
    window (or, with one action only, a second one): the action mix changes."""
    rows = current_rows(case)
    actions = case.events[ACTION].astype(str).to_numpy()
    mix = pd.Series(actions[: rows[0]]).value_counts()
    known = list(case.settings.events.actions)
    rare = next((a for a in known if a not in mix.index), None) if len(mix) == 1 else str(mix.index[-1])
    hit = rng.choice(rows, round(share * len(rows)), replace=False)
    changed = actions.copy()
    changed[hit] = rare
    return _with(case, ACTION, changed)


PLANTS: dict[str, Callable[[Case, float, np.random.Generator], Case]] = {
    "new_items": plant_new_items,
    "popularity": plant_popularity_shift,
    "action_mix": plant_action_mix,
}


def _with(case: Case, column: str, values: np.ndarray) -> Case:
    events = case.events.copy()
    events[column] = pd.Series(values).astype("category")
    return Case(events, case.settings, case.end)


# --- the development sets, read at run time (never copied into the repository) ---------------------------------


def read_movielens(folder: Path) -> pd.DataFrame:
    """ml-100k u.data as the check's event frame (ratings as actions, recflow.events.importers)."""
    from recflow.events.importers import import_movielens

    table = import_movielens(folder)
    return _events(
        pd.DataFrame(
            {
                **{c: table[c].to_pandas() for c in (USER_ID, ITEM_ID, ACTION)},
                "ts": pc.cast(table[TIMESTAMP], "int64").to_numpy(),
            }
        )
    )


def read_yoochoose(path: Path) -> pd.DataFrame:
    """YooChoose clicks (SessionId, ItemId, Time in unix seconds): a session is the user, every event a view."""
    raw = pd.read_csv(path, sep="\t", dtype={"SessionId": str, "ItemId": str, "Time": float})
    ts = np.round(raw["Time"].to_numpy() * 1000).astype(np.int64)
    return _events(pd.DataFrame({USER_ID: raw["SessionId"], ITEM_ID: raw["ItemId"], ACTION: "view", "ts": ts}))


def _events(frame: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({c: frame[c].astype(str).astype("category") for c in (USER_ID, ITEM_ID, ACTION)})
    out["ts"] = frame["ts"].to_numpy().astype(np.int64)
    return out.sort_values("ts", kind="stable", ignore_index=True)
