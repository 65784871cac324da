"""Online serving: the deployed two-stage model, answering for users whose newest events it has folded in.

`OnlineRecommender` wraps one `ModelBundle` and a `UserState` (userstate.py) and is what the BentoML service
(bentos/service.py) adapts to HTTP:

- `record_events(records)` validates JSON records with the event store's own rules
  (`events.rowwise.validate_request`: the contract's rule set, checked row by row for a request's few events),
  stores the accepted ones per user, and folds every affected user's vector in at once. Fold-in is exact ALS:
  the vector is re-solved (implicit's Cholesky `recalculate_user`) from the user's whole row, the confidence
  the model was trained on plus the new events weighted exactly as training weighs them (action weight x time
  decay, `features.confidence_matrix`, relative to the model's reference time, so an event newer than the
  training data counts in full), against the fixed item factors. Items or actions the model does not know are
  stored but cannot move the vector until the next training; they are dropped before the solve (implicit does
  not bounds-check item ids).
- `recommend(user_id, k, exclude_seen, recent)`: ALS top-N from the (folded) vector plus popular items, then
  the ranker, then top-k, by `model.scoring.score_users`, as of the newest event the service holds (the
  model's own moment until one arrives). Items the user had, in training or in events received since, are
  excluded. The ranker's user features see the user's new events (recent items, action counts, item count,
  recency). Popularity (popular candidates and answers) and the ranker's item features (popularity windows,
  action counts, first time, transitions) count every user's events since the model: `refresh_items` reads
  the users whose events changed (the user state's change feed, which every worker writes to) and adds their
  new events to the `ItemView` (counting everyone's again when a user's events were dropped or rewritten), on a
  thread beside the requests, at most every `service.item_stats_seconds` and no sooner than ten times the last
  refresh took, the way `recommend --as-of` computes them from a history (`ranker_features.with_events`,
  `selection.PopularityAfter`). At load, the scan that prunes the
  state also notes the events it keeps; until it ends, item statistics are the model's. Events of unknown
  items or actions change neither the vector nor the features; they are kept for the next training.
- Unknown users get the popular items, or a folded-in vector when their stored or request events name items
  the model knows.
- What the model was trained on is what its training data holds (`ModelBundle.events`), not what arrived before
  the wall-clock training time: an event is in the model when the user's training events include one of the
  same item, action and time (to the second; each training event matches one stored event). So events that
  reached the event store after the features snapshot, or arrived late with an old timestamp, are folded in
  until a model is trained on them; an event after the user's last trained event needs no look-up. A bundle
  saved without its events (before recflow kept them) cuts at the user's last trained event instead.
- Events the model was trained on are pruned from the user state (`prune_state` when a version is loaded, and
  whenever a user is read): their items are in the training row, so they are still excluded, and counted once
  in the fold-in row and the ranker's user features. After a rollback to an older version, events a newer one
  had pruned are in the event store (and the next training), no longer in the fold-in.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from recflow.config import EventSettings
from recflow.constants import ACTION, EVENT_ID, ITEM_ID, TIMESTAMP, USER_ID
from recflow.errors import UserStateUnavailableError
from recflow.events.contract import Rejection, ValidatedBatch
from recflow.events.rowwise import validate_request
from recflow.model.bundle import ModelBundle
from recflow.model.features import Interactions, confidence_matrix, decay
from recflow.model.metrics import PAD
from recflow.model.ranker_features import FeatureContext, following, with_events
from recflow.model.scoring import KIND_POPULARITY, score_users
from recflow.model.selection import PopularityAfter
from recflow.serving.userstate import StoredVector, UserEvent, UserState

logger = logging.getLogger(__name__)

Strategy = Literal["personalized", "popular"]


@dataclass(frozen=True)
class Recommendation:
    user_id: str
    items: list[tuple[str, float]]
    strategy: Strategy


@dataclass(frozen=True)
class EventsOutcome:
    accepted: int  # valid events (new or duplicate)
    duplicates: int  # accepted events already stored (same event_id): they change nothing
    rejected: list[Rejection]
    users_updated: list[str]  # users whose vector was re-solved (they had an event the model can use)
    unknown_items: list[str]  # stored, but not in the model: cannot move a vector until the next training
    unknown_actions: list[str]  # valid in params.yaml but not trained on: stored, cannot move a vector


@dataclass(frozen=True)
class _Since:
    """A user's usable events the model was not trained on, in time order, as model indices."""

    index: int  # the user's row in the bundle, -1 when the model has never seen the user
    items: np.ndarray
    actions: np.ndarray
    ts: np.ndarray


@dataclass(frozen=True)
class ItemView:
    """The model with its item statistics (popularity, the ranker's item features) as of `moment`: the newest
    event the service holds that the model was not trained on (+1 s), or the model's own moment without any."""

    moment: float
    bundle: ModelBundle
    events: int  # events since the model counted in it


@dataclass(frozen=True)
class _User:
    """What serving knows about one user: training row (if any) and the stored events the model was not trained on."""

    user_id: str
    index: int  # row in the bundle, -1 when the model has never seen the user
    events: list[UserEvent]


class OnlineRecommender:
    """One deployed model version answering requests, with per-user state folded in."""

    def __init__(
        self,
        bundle: ModelBundle,
        version: str,
        state: UserState,
        events: EventSettings,
        *,
        item_stats_seconds: float = 1.0,
    ) -> None:
        self.bundle = bundle
        self.version = version
        self.state = state
        self.event_settings = events
        self.item_index = {item: i for i, item in enumerate(bundle.item_ids)}
        self.action_index = {action: i for i, action in enumerate(bundle.actions)}
        bundle.solver  # noqa: B018 - the fold-in solver is set up here, not on the first request
        self.cold = np.asarray(bundle.history.getnnz(axis=0)) == 0
        self.cold_items = np.flatnonzero(self.cold)
        self.item_stats_seconds = item_stats_seconds
        self.items = ItemView(bundle.moment, bundle, 0)
        self._since: dict[str, _Since] = {}  # each user's usable events since the model, as last read
        self._changed: set[str] = set()  # users noted since self.items was made
        self._counted: dict[str, _Since] = {}  # the events self.items counts, per user
        self._counted_events: tuple[np.ndarray, ...] = (np.zeros(0, np.int64),) * 3  # all of them: items, actions, ts
        try:
            self._cursor: str | None = state.changes(None)[1]
        except UserStateUnavailableError:  # the first refresh that reaches the state reads every user
            self._cursor = None
        self._due = -np.inf  # monotonic time of the next refresh
        self._refreshing = threading.Lock()

    # -- events -------------------------------------------------------------------------------------------

    def validate_events(self, records: Sequence[Mapping[str, Any]]) -> ValidatedBatch:
        """Check JSON records against the event contract with the event store's own rules."""
        return validate_request(records, settings=self.event_settings, source="request")

    def apply_events(self, batch: ValidatedBatch, *, now: float | None = None) -> EventsOutcome:
        """Store the accepted events per user and fold every affected user's vector in at once."""
        received = time.time() if now is None else now
        by_user = _user_events(batch.accepted, received)
        new = self.state.add_events(by_user) if by_user else 0
        folded = self.fold_in(sorted(by_user))
        table = batch.accepted
        return EventsOutcome(
            accepted=table.num_rows,
            duplicates=table.num_rows - new,
            rejected=batch.rejected,
            users_updated=sorted(folded),
            unknown_items=sorted({i for i in table[ITEM_ID].to_pylist() if i not in self.item_index}),
            unknown_actions=sorted({a for a in table[ACTION].to_pylist() if a not in self.action_index}),
        )

    def record_events(self, records: Sequence[Mapping[str, Any]], *, now: float | None = None) -> EventsOutcome:
        """Validate, store and fold in a batch of event records (see the module docstring)."""
        return self.apply_events(self.validate_events(records), now=now)

    def validate_recent(
        self, user_id: str, records: Sequence[Mapping[str, Any]]
    ) -> tuple[list[UserEvent], list[Rejection]]:
        """Request-scoped events (`recent_events` of /recommend): validated like any event, never stored."""
        batch = validate_request([{**r, USER_ID: user_id} for r in records], settings=self.event_settings)
        return _user_events(batch.accepted, time.time()).get(user_id, []), batch.rejected

    def in_model(self, index: int, events: Sequence[UserEvent]) -> list[bool]:
        """Whether the model was trained on each of a user's events (the user's row in the bundle, -1 if none):
        one of the user's training events has its item, action and time, each training event matching once. An
        event after the user's last trained event, or of an item or action the model lacks, is not in it."""
        last = self._trained_last(index)
        maybe = [e.ts <= last for e in events]
        if not any(maybe):
            return maybe
        by_user = self._trained_events
        if by_user is None:  # a bundle saved without its events: the user's last trained event is the cut
            return maybe
        order, starts = by_user
        trained = self.bundle.events
        assert trained is not None
        rows = order[starts[index] : starts[index + 1]]
        unmatched = Counter(
            zip(
                trained.item_idx[rows].tolist(),
                trained.action_idx[rows].tolist(),
                trained.ts[rows].tolist(),
                strict=True,
            )
        )
        flags = []
        for event, candidate in zip(events, maybe, strict=True):
            key = (self.item_index.get(event.item_id), self.action_index.get(event.action), event.ts)
            inside = candidate and unmatched[key] > 0
            unmatched[key] -= inside
            flags.append(inside)
        return flags

    @cached_property
    def _trained_events(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The bundle's training events grouped by user: user u's are `events[order[starts[u]:starts[u + 1]]]`
        (built on the first look-up: only events at or before a user's last trained event need one)."""
        events = self.bundle.events
        if events is None:
            return None
        order = np.argsort(events.user_idx, kind="stable")
        starts = np.searchsorted(events.user_idx[order], np.arange(len(self.bundle.user_ids) + 1))
        return order.astype(np.int32 if len(order) < 2**31 else np.int64), starts

    def prune_state(self) -> int:
        """Drop from the user state every stored event this model was trained on, and every vector of another
        version (the service calls it when it starts serving a version), and note the others for the item
        statistics (`refresh_items`). Returns how many events were dropped."""
        began, dropped = time.perf_counter(), 0
        if self.bundle.events is not None:
            self._popularity  # noqa: B018 - read the training events for the item view here, not in a request
        for user_ids in self.state.users():
            users, trained = self._split(user_ids)
            dropped += self.state.prune(self.version, trained)  # every user: other versions' vectors go too
            with self._refreshing:
                self._note_since(users, replace=False)
        logger.info(
            "pruned %d events model %s was trained on in %.1f s", dropped, self.version, time.perf_counter() - began
        )
        if self.item_stats_seconds > 0:  # the item view counts what the scan kept from now on
            self.refresh_items()
        return dropped

    def _trained_ids(self, index: int, events: Sequence[UserEvent]) -> list[str]:
        return [e.event_id for e, inside in zip(events, self.in_model(index, events), strict=True) if inside]

    # -- fold-in ------------------------------------------------------------------------------------------

    def user_rows(self, users: Sequence[_User]) -> sp.csr_matrix:
        """Each user's confidence row over the model's items: training row + new events of known items and
        actions, weighted as `features.confidence_matrix` weighs training events."""
        index = np.array([u.index for u in users], dtype=np.int64)
        known = index >= 0
        base = sp.diags(known.astype(np.float32)) @ self.bundle.history[np.where(known, index, 0)]
        rows, items, actions, stamps = [], [], [], []
        for row, user in enumerate(users):
            for event in self._usable(user.events):  # unknown ids never reach implicit
                rows.append(row)
                items.append(self.item_index[event.item_id])
                actions.append(self.action_index[event.action])
                stamps.append(event.ts)
        inter = Interactions(
            user_idx=np.asarray(rows, dtype=np.int32),
            item_idx=np.asarray(items, dtype=np.int32),
            action_idx=np.asarray(actions, dtype=np.int8),
            ts=np.asarray(stamps, dtype=np.int64),
            split=np.zeros(len(rows), dtype=np.int8),
            user_ids=np.asarray([u.user_id for u in users], dtype=object),
            item_ids=self.bundle.item_ids,
            actions=self.bundle.actions,
        )
        # decay runs back from each user's last event: the trained row (anchored at the last trained event)
        # ages by the time to the newest event, and the new events are weighed from it
        trained_last = np.array([self._trained_last(u.index) for u in users], dtype=np.float64)
        newest = np.full(len(users), -np.inf)
        if len(rows):
            np.maximum.at(newest, inter.user_idx, inter.ts.astype(np.float64))
        anchor = np.fmax(trained_last, newest)
        aged = np.where(np.isfinite(trained_last), anchor - trained_last, 0.0)
        base = sp.diags(decay(aged, self.bundle.half_life_days).astype(np.float32)) @ base
        new = confidence_matrix(
            inter, self.bundle.action_weights, self.bundle.half_life_days, len(users), anchor=anchor
        )
        return (base + new).tocsr()

    def solve(self, rows: sp.csr_matrix) -> np.ndarray:
        """Exact ALS user vectors for confidence rows against the fixed item factors (Cholesky solve)."""
        return self.bundle.solve(rows)

    def fold_in(self, user_ids: Sequence[str]) -> dict[str, StoredVector]:
        """Re-solve and store the vectors of these users from their training rows and stored events."""
        users = self._users(user_ids)
        vectors = self._fold(users)
        if vectors:
            self.state.put_vectors(self.version, vectors)
        logger.debug("folded in %d of %d users", len(vectors), len(users))
        return vectors

    def _usable(self, events: Sequence[UserEvent]) -> list[UserEvent]:
        """The events that can move a vector (of those not trained on): of an item and an action the model knows."""
        return [e for e in events if e.item_id in self.item_index and e.action in self.action_index]

    def _fold(self, users: Sequence[_User]) -> dict[str, StoredVector]:
        """Vectors of the users with at least one usable event; the others keep their trained vector (or none)."""
        counts = {u.user_id: len(self._usable(u.events)) for u in users}
        users = [u for u in users if counts[u.user_id]]
        solved = self.solve(self.user_rows(users))
        return {u.user_id: StoredVector(solved[i], counts[u.user_id]) for i, u in enumerate(users)}

    def _split(self, user_ids: Sequence[str]) -> tuple[list[_User], dict[str, list[str]]]:
        """The users with their stored events less those the model was trained on, and those events' ids."""
        stored = self.state.events(user_ids)
        users, trained = [], {}
        for user_id in user_ids:
            index = self.bundle.user_index.get(user_id, -1)
            events = stored.get(user_id, [])
            trained[user_id] = ids = self._trained_ids(index, events)
            if ids:
                dropped = set(ids)
                events = [e for e in events if e.event_id not in dropped]
            users.append(_User(user_id, index, events))
        return users, trained

    def _users(self, user_ids: Sequence[str]) -> list[_User]:
        """The users with their stored events; events the model was trained on are pruned from the state here."""
        users, trained = self._split(user_ids)
        trained = {user_id: ids for user_id, ids in trained.items() if ids}
        if trained:
            self.state.prune(self.version, trained)
        return users

    def _trained_last(self, index: int) -> float:
        """The user's last event in the training data (-inf for a user the model has not seen)."""
        last = float(self.bundle.context.user_last_ts[index]) if index >= 0 else np.nan
        return last if np.isfinite(last) else -np.inf

    def vector(self, user: _User) -> np.ndarray | None:
        """The user's current vector: trained, stored folded-in, or folded now (and stored) when stale."""
        usable = len(self._usable(user.events))
        if not usable:
            return self.bundle.user_factors[user.index] if user.index >= 0 else None
        stored = self.state.vectors(self.version, [user.user_id]).get(user.user_id)
        if stored is None or stored.n_events != usable:  # stale: events since (a model version only gains events)
            stored = self._fold([user])[user.user_id]
            self.state.put_vectors(self.version, {user.user_id: stored})
        return stored.vector

    # -- item statistics as of the newest event --------------------------------------------------------------

    def _note_since(self, users: Sequence[_User], *, replace: bool) -> None:
        """Keep each user's usable events since the model for the item statistics; `replace=False` (the scan at
        load) leaves a user that a newer read from the change feed has already noted."""
        for user in users:  # the caller holds self._refreshing
            if not replace and user.user_id in self._since:
                continue
            usable = self._usable(user.events)
            if usable:
                self._since[user.user_id] = _Since(
                    user.index,
                    np.array([self.item_index[e.item_id] for e in usable], dtype=np.int64),
                    np.array([self.action_index[e.action] for e in usable], dtype=np.int64),
                    np.array([e.ts for e in usable], dtype=np.int64),
                )
            else:
                self._since.pop(user.user_id, None)
            self._changed.add(user.user_id)

    def current_items(self) -> ItemView:
        """The item view to answer with, as it is. When a refresh is due (every `item_stats_seconds`, 0: never, and
        no sooner than ten times the last one took, so rebuilding costs at most a tenth of a worker's time whatever
        is held) it starts on a thread of its own: no request waits for it."""
        clock = time.monotonic()
        if self.item_stats_seconds > 0 and clock >= self._due and not self._refreshing.locked():
            self._due = clock + self.item_stats_seconds
            threading.Thread(target=self._refresh_in_background, name="recflow-items", daemon=True).start()
        return self.items

    def _refresh_in_background(self) -> None:
        began = time.monotonic()
        try:
            self.refresh_items()
        except Exception:  # the view stays as it was; the next due request tries again
            logger.exception("refreshing the item statistics of %s failed; the previous ones still serve", self.version)
        self._due = max(self._due, began + 10 * (time.monotonic() - began))

    def refresh_items(self) -> ItemView:
        """Read the users whose events changed since the last read (every worker's, through the user state's
        change feed) and rebuild the item view when anything did (after a refresh already running)."""
        if self.bundle.events is None:
            return self.items  # a bundle saved without its events has no history to count from
        with self._refreshing:
            if self._cursor is None:  # the state was unreachable when this version loaded
                changed, self._cursor = self.state.changes(None)
                changed = None
            else:
                changed, self._cursor = self.state.changes(self._cursor)
                if changed is None:
                    logger.warning("the user state's change feed lost entries this worker had not read; reading all")
            if changed is None:  # read every user again
                changed = [u for batch in self.state.users() for u in batch]
            for start in range(0, len(changed), 1000):
                self._note_since(self._users(changed[start : start + 1000]), replace=True)
            if self._changed:  # noted users stay noted until a view counts them
                self.items = self._item_view(self._changed)
                self._changed = set()
        return self.items

    def _item_view(self, changed: set[str]) -> ItemView:
        """The item view with every user's events since the model: the current view plus what the `changed`
        users added after the events it counts, when that is all they did (new events come after a user's
        others); rebuilt from every user's events otherwise (events dropped or rewritten). Either way the same
        statistics, so a refresh costs the added events and a copy of the item keys, not the events held."""
        added: list[_Since] = []
        previous = []
        for user_id in changed:
            new, old = self._since.get(user_id), self._counted.get(user_id)
            if new is None and old is None:
                continue
            if new is None or (old is not None and not _extends(new, old)):
                return self._rebuilt_view()
            start = 0 if old is None else len(old.items)
            if len(new.items) > start:
                added.append(_Since(new.index, new.items[start:], new.actions[start:], new.ts[start:]))
                previous.append(self._trained_last_item(new.index) if old is None else int(old.items[-1]))
        if added:  # counted once the view is made (a failed refresh leaves everything as it was)
            view, self._counted_events = self._view_adding(self.items, self._counted_events, added, previous)
        else:
            view = self.items
        for user_id in changed:
            if user_id in self._since:
                self._counted[user_id] = self._since[user_id]
        return view

    def _rebuilt_view(self) -> ItemView:
        since = list(self._since.values())
        view = ItemView(self.bundle.moment, self.bundle, 0)
        counted: tuple[np.ndarray, ...] = (np.zeros(0, np.int64),) * 3
        if since:
            view, counted = self._view_adding(view, counted, since, [self._trained_last_item(s.index) for s in since])
        self._counted, self._counted_events = dict(self._since), counted
        return view

    def _view_adding(
        self, view: ItemView, counted: tuple[np.ndarray, ...], added: Sequence[_Since], previous: Sequence[int]
    ) -> tuple[ItemView, tuple[np.ndarray, ...]]:
        """`view` (which counts the events `counted`) with these users' later events (`previous`: each one's last
        item before them, PAD for none): popularity and the ranker's item statistics as `recommend_as_of` computes
        them from a history, as of the newest event held (+1 s); and the events the new view counts."""
        items, actions, ts = (np.concatenate([getattr(s, f) for s in added]) for f in ("items", "actions", "ts"))
        every = tuple(np.concatenate([held, new]) for held, new in zip(counted, (items, actions, ts), strict=True))
        moment = max(view.moment, float(ts.max()) + 1.0)
        moves = following(np.array(previous, dtype=np.int64), [s.items for s in added], len(self.bundle.item_ids))
        context = with_events(view.bundle.context, items, actions, ts, moves)
        popularity = self._popularity(every[0], every[1], every[2], moment)
        bundle = dataclasses.replace(self.bundle, context=context, popularity=popularity)
        return ItemView(moment, bundle, len(every[0])), every

    def _trained_last_item(self, index: int) -> int:
        return int(self.bundle.context.recent_items[index, 0]) if index >= 0 else PAD

    @cached_property
    def _popularity(self) -> PopularityAfter:
        trained = self.bundle.events
        assert trained is not None
        window = float(self.bundle.info.get("popularity_window_days", 0.0))
        return PopularityAfter(trained, self.bundle.action_weights, self.bundle.moment, window)

    # -- answers ------------------------------------------------------------------------------------------

    def recommend(
        self, user_id: str, k: int, *, exclude_seen: bool = True, recent: Sequence[UserEvent] = ()
    ) -> Recommendation:
        (user,) = self._users([user_id])
        view = self.current_items()
        if recent:  # request-scoped history: folded for this answer only, unless the model was trained on it
            known = {e.event_id for e in user.events}
            fresh = [e for e in recent if e.event_id not in known]
            fresh = [e for e, inside in zip(fresh, self.in_model(user.index, fresh), strict=True) if not inside]
            user = dataclasses.replace(user, events=[*user.events, *fresh])
            folded = self._fold([user]).get(user_id)
            vector = folded.vector if folded is not None else self.vector(user)
        else:
            vector = self.vector(user)
        if vector is None:
            return self.popular(user_id, k, seen=self._seen(user) if exclude_seen else None, view=view)
        seen = self._seen(user)
        items, scores = self._two_stage(view, user, vector, seen if exclude_seen else None, k)
        strategy: Strategy = "popular" if self.bundle.kind == KIND_POPULARITY else "personalized"
        return Recommendation(user_id, self._answer(items, scores), strategy)

    def popular(
        self, user_id: str, k: int, seen: np.ndarray | None = None, view: ItemView | None = None
    ) -> Recommendation:
        bundle = (view or self.current_items()).bundle
        order = bundle.popular_order
        if seen is not None and len(seen):
            order = order[~np.isin(order, seen)]
        top = order[:k]
        return Recommendation(user_id, self._answer(top, bundle.popularity[top]), "popular")

    def similar(self, item_id: str, k: int) -> list[tuple[str, float]] | None:
        """The k items closest to `item_id` by cosine of ALS item factors; None when the model lacks it."""
        index = self.item_index.get(item_id)
        if index is None:
            return None
        unit = self.bundle.context.item_vectors
        scores = unit @ unit[index]
        scores[index] = -np.inf
        scores[self.cold] = -np.inf
        top = _top(scores, k)
        return self._answer(top, scores[top])

    def _seen(self, user: _User) -> np.ndarray:
        """Model item indices the user had: the training row plus every stored event of a known item."""
        had = self.bundle.history[user.index].indices if user.index >= 0 else np.zeros(0, dtype=np.int64)
        new = [self.item_index[e.item_id] for e in user.events if e.item_id in self.item_index]
        return np.union1d(had, np.asarray(new, dtype=np.int64)).astype(np.int64)

    def _two_stage(
        self, view: ItemView, user: _User, vector: np.ndarray, seen: np.ndarray | None, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The user's top-k by the bundle's own scoring function (model.scoring), from the user's current row,
        vector and ranker features, as of the view's moment."""
        bundle = view.bundle
        rows = self.user_rows([user])
        rerank_fn = (
            bundle.rerank_fn(np.zeros(1, dtype=np.int64), context=self._context(view, user), num_threads=1)
            if bundle.ranker is not None
            else None
        )
        items, scores = score_users(
            bundle,
            rows,
            k,
            vectors=np.asarray(vector, dtype=np.float32)[None, :],
            rerank_fn=rerank_fn,
            seen=[np.zeros(0, dtype=np.int64) if seen is None else seen],
            exclude_seen=seen is not None,
        )
        keep = items[0] != PAD
        return items[0][keep], scores[0][keep]

    def _context(self, view: ItemView, user: _User) -> FeatureContext:
        """The ranker's feature context for this one user (row 0) as of the view's moment: trained user
        statistics updated with the usable events received since (known items and actions), the view's item
        statistics."""
        ctx = view.bundle.context
        n_actions = len(self.bundle.actions)
        if user.index >= 0:
            i = user.index
            counts, n_items = ctx.user_action_counts[i].copy(), float(ctx.user_n_items[i])
            last, recent = float(ctx.user_last_ts[i]), ctx.recent_items[i].copy()
            had = set(self.bundle.history[i].indices.tolist())
        else:
            counts, n_items = np.zeros(n_actions, dtype=np.float32), 0.0
            last, recent, had = np.nan, np.full(ctx.recent_items.shape[1], PAD, dtype=np.int64), set()
        ref = view.moment
        events = self._usable(user.events)  # like the vector, the features ignore what the model does not know
        newest = [self.item_index[e.item_id] for e in sorted(events, key=lambda e: e.ts, reverse=True)]
        for event in events:
            counts[self.action_index[event.action]] += 1
        n_items += len({item for item in newest if item not in had})
        if events:  # an event newer than the view's moment counts as happening at it (recency 0)
            last = max(np.nan_to_num(last, nan=-np.inf), min(float(max(e.ts for e in events)), ref))
        recent = np.concatenate([np.asarray(newest, dtype=np.int64), recent[recent != PAD]])[: len(recent)]
        recent = np.pad(recent, (0, ctx.recent_items.shape[1] - len(recent)), constant_values=PAD)
        return dataclasses.replace(
            ctx,
            ref_time=np.array([ref]),
            user_last_ts=np.array([last]),
            user_n_items=np.array([n_items], dtype=np.float32),
            user_action_counts=counts[None, :],
            recent_items=recent[None, :],
        )

    def _answer(self, items: np.ndarray, scores: np.ndarray) -> list[tuple[str, float]]:
        keep = np.isfinite(scores) & (items != PAD)
        return [
            (str(self.bundle.item_ids[i]), round(float(s), 6)) for i, s in zip(items[keep], scores[keep], strict=True)
        ]


def _extends(new: _Since, old: _Since) -> bool:
    """`new` is `old` followed by more events."""
    n = len(old.items)
    return len(new.items) >= n and all(
        np.array_equal(getattr(new, f)[:n], getattr(old, f)) for f in ("items", "actions", "ts")
    )


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n highest finite scores, best first."""
    n = min(n, int(np.isfinite(scores).sum()))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-scores, n - 1)[:n]
    return part[np.argsort(-scores[part], kind="stable")].astype(np.int64)


def _user_events(table: pa.Table, received_at: float) -> dict[str, list[UserEvent]]:
    """Accepted events (events.STORE_SCHEMA) grouped by user."""
    out: dict[str, list[UserEvent]] = {}
    stamps = table[TIMESTAMP].cast(pa.int64()).to_pylist()  # epoch milliseconds
    columns = zip(
        table[USER_ID].to_pylist(), table[EVENT_ID].to_pylist(), table[ITEM_ID].to_pylist(),
        table[ACTION].to_pylist(), stamps, strict=True,
    )  # fmt: skip
    for user_id, event_id, item_id, action, ms in columns:
        out.setdefault(user_id, []).append(UserEvent.of(event_id, item_id, action, ms // 1000, received_at))
    return out
