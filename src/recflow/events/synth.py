"""Synthetic event streams with structure a recommender can learn, at any scale, fully vectorised.

The generative story (all draws from `numpy.random.Generator`s spawned from `settings.seed`):

- Catalogue: every item belongs to one of `groups` latent taste groups; within its group it has a Zipf
  (power-law) base popularity. 60% of the items are a back catalogue released long before the time range;
  the rest are released at a constant rate over the time range and the `days` before it, so the share of
  "new" items is the same in every window. An item gets no events before its release, and a fresh item is
  hot: its weight is boosted by `1 + 3 * 2^(-age / half_life)` with a half-life of 10% of the time range.
- Users: each has a primary group, half of them a secondary group, and a Pareto (power-law) activity.
- Sessions: a user's session picks one of the user's groups and holds a geometric number of item
  engagements (mean 3) a minute or two apart; 10% of engagements wander to a random group (noise).
- Funnel: an engagement is a chain view -> click -> add_to_cart -> purchase on one item, each step taken with
  a conversion probability (purchase and cart scaled by a per-item quality), so a purchase is always preceded
  by the earlier steps on the same item in the same session. Purchases carry a quantity in `value`.
- Drift (`DriftSpec`): from `start_fraction` of the time range on, some popular items swap popularity with
  unpopular ones of the same group, brand-new items take `new_items_share` of the engagements, and the
  conversion probabilities shrink by `action_mix_shift` (more views, fewer purchases).

Item draws use one `searchsorted` over concatenated per-(regime, time bucket, group) CDFs; there is no Python
loop over events, users or items.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recflow.config import GenerateSettings
from recflow.constants import ACTION, ITEM_ID, TIMESTAMP, USER_ID, VALUE
from recflow.errors import ConfigError
from recflow.events.contract import EVENT_SCHEMA
from recflow.events.parse import TIMESTAMP_TYPE

logger = logging.getLogger(__name__)

DEFAULT_START = datetime(2024, 1, 1, tzinfo=UTC)
ACTIONS = ("view", "click", "add_to_cart", "purchase")

_DAY_MS = 86_400_000
_FUNNEL = (0.30, 0.35, 0.50)  # P(click | view), P(add_to_cart | click), P(purchase | add_to_cart)
_CHAINS_PER_SESSION = 3.0
_CHAIN_GAP_MS = 90_000  # mean time between two engagements of a session
_STEP_GAP_MS = (5_000, 120_000)  # time between two funnel steps on one item
_BACK_CATALOGUE = 0.6
_ZIPF = 1.0
_HOT_BOOST = 3.0
_HALF_LIFE_SHARE = 0.1
_SECOND_GROUP_USERS = 0.5
_SECOND_GROUP_SESSIONS = 0.3
_NOISE = 0.1
_POPULAR_SHARE = 0.1
_NEW_ITEMS_SHARE_OF_CATALOGUE = 0.1
_MAX_BUCKETS = 128


@dataclass(frozen=True)
class DriftSpec:
    """A change of distribution from `start_fraction` of the time range on (rounded to a time bucket)."""

    start_fraction: float = 0.5  # drift applies to events after this fraction of the time range
    popularity_shift: float = 0.5  # share of the popular items whose popularity is reassigned to others
    new_items_share: float = 0.2  # share of drifted-window events that go to items never seen before
    action_mix_shift: float = 0.5  # conversion probabilities are multiplied by (1 - action_mix_shift)

    def __post_init__(self) -> None:
        for name in ("start_fraction", "popularity_shift", "new_items_share", "action_mix_shift"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"DriftSpec.{name} must be between 0 and 1, got {value}")


@dataclass(frozen=True)
class _Catalogue:
    group: np.ndarray  # int64 per item (back catalogue + fresh, then drift-only new items)
    release_bucket: np.ndarray  # int64: the item exists from the start of this time bucket on
    popularity: np.ndarray  # base Zipf weight
    drift_popularity: np.ndarray  # weight after the popularity shift
    quality: np.ndarray  # multiplies the cart and purchase probabilities
    n_base: int  # items that exist without drift: settings.items
    groups: int
    buckets: int
    range_ms: int
    drift_bucket: int  # first drifted bucket (buckets when there is no drift)


def generate_events(
    settings: GenerateSettings,
    *,
    drift: DriftSpec | None = None,
    start: datetime | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> pa.Table:
    """Exactly `settings.events` events over `settings.days` days from `start` (default 2024-01-01 UTC).

    Deterministic given the seed. Columns as `events.EVENT_SCHEMA`, sorted by timestamp; no event_id (the store
    derives it). `progress(done, total)` is called after each of a handful of stages.
    """
    cat = _catalogue(settings, drift)
    steps = 5
    report = progress or (lambda done, total: None)
    start_ms = _epoch_ms(start or DEFAULT_START)
    cdf, order = _item_cdf(cat, drift)
    report(1, steps)

    _, _, rng_users, rng_events = _streams(settings.seed)
    n_users, groups = settings.users, cat.groups
    primary = rng_users.integers(groups, size=n_users)
    secondary = (primary + 1 + rng_users.integers(max(groups - 1, 1), size=n_users)) % groups
    has_second = (rng_users.random(n_users) < _SECOND_GROUP_USERS) & (groups > 1)
    activity = rng_users.pareto(2.0, size=n_users) + 1.0
    activity_cdf = np.cumsum(activity)
    activity_cdf /= activity_cdf[-1]
    report(2, steps)

    funnel = np.array(_FUNNEL)
    drift_funnel = funnel * (1.0 - drift.action_mix_shift) if drift else funnel
    per_chain = 1.0 + np.cumprod(np.minimum(funnel, drift_funnel)).sum()
    parts: list[tuple[np.ndarray, ...]] = []
    have = 0
    while have < settings.events:
        n_sessions = math.ceil((settings.events - have) / (per_chain * _CHAINS_PER_SESSION) * 1.05) + 16
        forced = np.arange(n_users) if not parts and n_users <= n_sessions // 2 else np.empty(0, np.int64)
        sampled = _search(activity_cdf, rng_events.random(n_sessions - len(forced)))
        users = np.concatenate([forced, np.minimum(sampled, n_users - 1)])
        group = np.where(
            has_second[users] & (rng_events.random(n_sessions) < _SECOND_GROUP_SESSIONS),
            secondary[users],
            primary[users],
        )
        part = _chains(rng_events, cat, cdf, order, users, group, np.vstack([funnel, drift_funnel]))
        parts.append(part)
        have += int(part[3].sum())
    user, item, time, length = (np.concatenate(columns) for columns in zip(*parts, strict=True))
    del parts
    report(3, steps)

    ends = np.cumsum(length, dtype=np.int64)
    keep = int(np.searchsorted(ends, settings.events)) + 1
    user, item, time, length = user[:keep], item[:keep], time[:keep], length[:keep]
    length[-1] -= ends[keep - 1] - settings.events  # the last chain keeps a prefix of its funnel
    first = np.cumsum(length) - length  # position of each chain's first event
    chain = np.repeat(np.arange(keep, dtype=np.int32), length)
    step = (np.arange(settings.events, dtype=np.int64) - first[chain]).astype(np.int8)
    gap = rng_events.integers(_STEP_GAP_MS[0], _STEP_GAP_MS[1] + 1, size=settings.events)
    gap[step == 0] = 0
    offset = np.cumsum(gap)
    event_time = time[chain] + offset - offset[first[chain]]
    del gap, offset
    purchase = step == 3
    value = np.zeros(settings.events)
    value[purchase] = rng_events.geometric(0.75, size=int(purchase.sum()))  # quantity bought
    report(4, steps)

    sort = np.argsort(event_time, kind="stable")
    chain = chain[sort]
    table = pa.table(
        {
            USER_ID: _ids("u", n_users, _width(6, n_users)).take(pa.array(user[chain])),
            ITEM_ID: _ids("i", len(cat.group), _width(5, cat.n_base)).take(pa.array(item[chain])),
            ACTION: pa.array(ACTIONS).take(pa.array(step[sort])),
            TIMESTAMP: pa.array(event_time[sort] + start_ms).cast(TIMESTAMP_TYPE),
            VALUE: pa.array(value[sort], mask=~purchase[sort]),
        },
        schema=EVENT_SCHEMA,
    )
    report(5, steps)
    logger.info("generated %d events for %d users and %d items", table.num_rows, n_users, len(cat.group))
    return table


def item_catalogue(
    settings: GenerateSettings, *, drift: DriftSpec | None = None, start: datetime | None = None
) -> pa.Table:
    """The hidden truth behind `generate_events` with the same arguments: each item's group and release time.

    Columns item_id, group (int), release (timestamp), popularity (base weight), drift_only (an item that
    exists only in the drifted window). Useful for tests and for judging what a model has learned.
    """
    cat = _catalogue(settings, drift)
    edges = _bucket_edges(cat.release_bucket, cat.buckets, cat.range_ms) + _epoch_ms(start or DEFAULT_START)
    n = len(cat.group)
    return pa.table(
        {
            ITEM_ID: _ids("i", n, _width(5, cat.n_base)),
            "group": pa.array(cat.group),
            "release": pa.array(edges).cast(TIMESTAMP_TYPE),
            "popularity": pa.array(np.concatenate([cat.popularity, np.zeros(n - cat.n_base)])),
            "drift_only": pa.array(np.arange(n) >= cat.n_base),
        }
    )


def _catalogue(settings: GenerateSettings, drift: DriftSpec | None) -> _Catalogue:
    for name in ("users", "items", "events", "days", "groups"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"generate.{name} must be at least 1, got {getattr(settings, name)} (params.yaml)")
    rng_items, rng_drift, _, _ = _streams(settings.seed)
    n_items = settings.items
    groups = min(settings.groups, n_items)
    buckets = min(max(settings.days, 8), _MAX_BUCKETS)
    slot = np.empty(n_items, dtype=np.int64)
    slot[rng_items.permutation(n_items)] = np.arange(n_items)
    group, rank = slot % groups, slot // groups
    popularity = (rank + 1.0) ** -_ZIPF
    back = (rng_items.random(n_items) < _BACK_CATALOGUE) | (rank == 0)  # every group has an item from the start
    release = np.where(
        back, rng_items.integers(-3 * buckets, -buckets, size=n_items), rng_items.integers(-buckets, buckets, n_items)
    )
    quality = np.minimum(rng_items.lognormal(0.0, 0.4, size=n_items), 2.5)
    drift_popularity, drift_bucket = popularity, buckets
    if drift is not None:
        drift_bucket = min(round(drift.start_fraction * buckets), buckets)
        drift_popularity = _shift_popularity(rng_drift, popularity, group, rank, groups, drift.popularity_shift)
        if drift.new_items_share > 0:
            n_new = max(groups, round(_NEW_ITEMS_SHARE_OF_CATALOGUE * n_items))
            new_slot = rng_drift.permutation(n_new)
            group = np.concatenate([group, new_slot % groups])
            new_popularity = (new_slot // groups + 1.0) ** -_ZIPF
            drift_popularity = np.concatenate([drift_popularity, new_popularity])
            release = np.concatenate([release, np.full(n_new, drift_bucket)])
            quality = np.concatenate([quality, np.minimum(rng_drift.lognormal(0.0, 0.4, size=n_new), 2.5)])
    return _Catalogue(
        group, release, popularity, drift_popularity, quality, n_items, groups, buckets, settings.days * _DAY_MS,
        drift_bucket,
    )  # fmt: skip


def _shift_popularity(
    rng: np.random.Generator, popularity: np.ndarray, group: np.ndarray, rank: np.ndarray, groups: int, share: float
) -> np.ndarray:
    """Swap the weight of `share` of each group's popular items (top 10%) with random unpopular ones."""
    shifted = popularity.copy()
    popular = rank < max(1, math.ceil(_POPULAR_SHARE * len(popularity) / groups))
    chosen = popular & (rng.random(len(popularity)) < share)
    for g in range(groups):  # a loop over the few taste groups, not over items
        movers = np.flatnonzero(chosen & (group == g))
        others = np.flatnonzero(~popular & (group == g))
        n = min(len(movers), len(others))
        partners = rng.choice(others, size=n, replace=False)
        shifted[movers[:n]], shifted[partners] = popularity[partners], popularity[movers[:n]]
    return shifted


def _item_cdf(cat: _Catalogue, drift: DriftSpec | None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated within-group item CDFs for every (regime, bucket, group) block k, offset by k.

    Drawing an item for block k is then `searchsorted(cdf, k + u)`; `order` maps positions to items.
    """
    order = np.argsort(cat.group, kind="stable")
    sorted_group = cat.group[order]
    starts = np.searchsorted(sorted_group, np.arange(cat.groups))
    ends = np.append(starts[1:], len(order)) - 1
    bucket = np.arange(cat.buckets)[:, None]
    age = (bucket - cat.release_bucket[order][None, :]) / cat.buckets
    fresh = 1.0 + _HOT_BOOST * np.exp2(-np.maximum(age, 0.0) / _HALF_LIFE_SHARE)
    released = age >= 0
    new = order >= cat.n_base
    blocks = []
    for regime, popularity in enumerate([cat.popularity, cat.drift_popularity][: 2 if drift else 1]):
        weight = np.where(released, fresh, 0.0) * np.pad(popularity, (0, len(order) - len(popularity)))[order]
        if regime == 1 and drift is not None and new.any():
            share = drift.new_items_share
            new_total = np.add.reduceat(np.where(new, weight, 0.0), starts, axis=1)
            old_total = np.add.reduceat(np.where(new, 0.0, weight), starts, axis=1)
            new_scale = np.divide(share, new_total, out=np.zeros_like(new_total), where=new_total > 0)
            old_scale = np.where(new_total > 0, 1.0 - share, 1.0) / old_total
            weight *= np.where(new, new_scale[:, sorted_group], old_scale[:, sorted_group])
        cum = np.cumsum(weight, axis=1)
        before = np.where(starts > 0, cum[:, np.maximum(starts - 1, 0)], 0.0)
        cum -= before[:, sorted_group]
        cum /= cum[:, ends][:, sorted_group]  # x / x == 1.0 exactly: every block ends at k + 1
        cum += (regime * cat.buckets + bucket) * cat.groups + sorted_group[None, :]
        blocks.append(cum.ravel())
    return np.concatenate(blocks), order


def _chains(
    rng: np.random.Generator,
    cat: _Catalogue,
    cdf: np.ndarray,
    order: np.ndarray,
    users: np.ndarray,
    group: np.ndarray,
    funnels: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Engagement chains of a batch of sessions: (user, item, start ms offset, funnel length 1-4) per chain."""
    n_sessions = len(users)
    per_session = rng.geometric(1.0 / _CHAINS_PER_SESSION, size=n_sessions)
    session = np.repeat(np.arange(n_sessions), per_session)
    n_chains = len(session)
    first = np.cumsum(per_session) - per_session
    gap = rng.exponential(_CHAIN_GAP_MS, size=n_chains).astype(np.int64) + 1_000
    gap[first] = 0
    offset = np.cumsum(gap)
    offset -= np.repeat(offset[first], per_session)
    duration = np.minimum(offset[first + per_session - 1] + 3 * _STEP_GAP_MS[1], cat.range_ms - 1)
    session_start = (rng.random(n_sessions) * (cat.range_ms - duration)).astype(np.int64)
    session_bucket = session_start * cat.buckets // cat.range_ms
    drifted = (session_bucket >= cat.drift_bucket).astype(np.int64)[session]

    chain_group = group[session]
    noise = rng.random(n_chains) < _NOISE
    chain_group[noise] = rng.integers(cat.groups, size=int(noise.sum()))
    block = (drifted * cat.buckets + session_bucket[session]) * cat.groups + chain_group
    position = _search(cdf, block + np.minimum(rng.random(n_chains), 1.0 - 1e-9))
    item = order[position % len(order)]

    quality = cat.quality[item]
    length = np.ones(n_chains, dtype=np.int64)
    for step in range(3):  # view -> click -> add_to_cart -> purchase
        probability = funnels[drifted, step] * (quality if step else 1.0)
        length += (length == step + 1) & (rng.random(n_chains) < np.minimum(probability, 0.95))
    return users[session].astype(np.int32), item.astype(np.int32), session_start[session] + offset, length


def _search(cdf: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """`searchsorted(cdf, queries, side="right")`, several times faster for many random queries (cache-friendly)."""
    order = np.argsort(queries)
    found = np.empty(len(queries), dtype=np.int64)
    found[order] = np.searchsorted(cdf, queries[order], side="right")
    return found


def _bucket_edges(bucket: np.ndarray, buckets: int, range_ms: int) -> np.ndarray:
    """Start (ms from the range start) of each bucket: ceil(b * range / buckets), valid for negative b too."""
    return -((-bucket * range_ms) // buckets)


def _streams(seed: int) -> list[np.random.Generator]:
    """Independent generators for items, drift, users and events: drift never changes the undrifted catalogue."""
    return [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(4)]


def _width(minimum: int, n: int) -> int:
    return max(minimum, len(str(n - 1)))


def _ids(prefix: str, n: int, width: int) -> pa.Array:
    """ "u000000", "u000001", ... (ids past the width simply grow longer)."""
    digits = pc.cast(pa.array(np.arange(n)), pa.string())
    return pc.binary_join_element_wise(prefix, pc.utf8_lpad(digits, width=width, padding="0"), "")


def _epoch_ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ConfigError(f"start {moment.isoformat()} has no time zone; pass an aware datetime, e.g. tzinfo=UTC")
    return round(moment.timestamp() * 1000)
