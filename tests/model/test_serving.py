"""Online serving: exact ALS fold-in, exclusion of what a user had, the popular fallback, and durable user state.

The bundle is trained once per module on a small generated project (tests/servingkit.py, ~10 s).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import redis

from recflow.config import EventSettings, Settings
from recflow.errors import ModelNotFoundError, UserStateUnavailableError
from recflow.model.bundle import ModelBundle
from recflow.model.features import build_features, decay
from recflow.model.training import BUNDLE_DIR, train
from recflow.serving import online
from recflow.serving.online import OnlineRecommender, Recommendation
from recflow.serving.userstate import LocalUserState, RedisUserState, UserEvent
from recflow.store.eventstore import ingest_json_lines

from .. import factories
from ..servingkit import train_small_project

REDIS_URL = "redis://127.0.0.1:6379/0"
NOW = "2026-11-24T07:00:00Z"  # after the generated data: such an event counts in full (age 0)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Path]:
    return train_small_project(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def bundle(project: tuple[Settings, Path]) -> ModelBundle:
    return ModelBundle.load(project[1])


Factory = Callable[..., OnlineRecommender]


@pytest.fixture
def make(bundle: ModelBundle, tmp_path: Path) -> Iterator[Factory]:
    states: list[LocalUserState] = []

    def make(state: str = "state.jsonl") -> OnlineRecommender:
        states.append(LocalUserState(tmp_path / state))
        # item statistics refreshed when a test asks (refresh_items), not on a thread that a request starts
        return OnlineRecommender(bundle, "v1", states[-1], EventSettings(), item_stats_seconds=0)

    yield make
    for state in states:
        state.close()


def event(user: str, item: str, action: str = "purchase", timestamp: str | int = NOW) -> dict[str, object]:
    return factories.event(user_id=user, item_id=item, action=action, timestamp=timestamp)


def unseen_items(bundle: ModelBundle, user: int, n: int) -> list[str]:
    """n items the user never had, of middling ALS score for the user (not already at the top)."""
    scores = bundle.item_factors @ bundle.user_factors[user]
    had = set(bundle.history[user].indices.tolist())
    order = [j for j in np.argsort(scores) if j not in had and bundle.history[:, j].nnz > 0]
    start = len(order) // 4
    return [str(bundle.item_ids[j]) for j in order[start : start + n]]


def least_squares(bundle: ModelBundle, row: np.ndarray) -> np.ndarray:
    """From scratch: argmin_x sum_i c_i (p_i - x.y_i)^2 + reg |x|^2 over the WHOLE catalogue, where observed
    items have p = 1 and c = alpha * confidence, and every other item p = 0, c = 1 (implicit's model)."""
    params = bundle.als_params
    Y = bundle.item_factors.astype(np.float64)
    weights = np.where(row > 0, params.alpha * row, 1.0)
    target = (row > 0).astype(np.float64)
    A = np.vstack([np.sqrt(weights)[:, None] * Y, np.sqrt(params.regularization) * np.eye(params.factors)])
    b = np.concatenate([np.sqrt(weights) * target, np.zeros(params.factors)])
    return np.linalg.lstsq(A, b, rcond=None)[0]


def test_fold_in_is_the_exact_least_squares_solution_of_the_users_full_row(bundle: ModelBundle, make: Factory) -> None:
    recommender = make()
    user = 7
    user_id = str(bundle.user_ids[user])
    new_items = unseen_items(bundle, user, 2)
    outcome = recommender.record_events(
        [event(user_id, new_items[0], "purchase"), event(user_id, new_items[1], "view")]
    )
    assert outcome.accepted == 2 and outcome.users_updated == [user_id]
    # decay runs back from the user's last event: the training row ages by the time from the last trained event
    # to the new ones, and the new events (the newest) count at their action weight
    gap = float(datetime.fromisoformat(NOW).timestamp()) - float(bundle.context.user_last_ts[user])
    expected_row = (
        bundle.history[user].toarray().ravel().astype(np.float64) * decay(np.array([gap]), bundle.half_life_days)[0]
    )
    weights = dict(zip(bundle.actions, bundle.action_weights, strict=True))
    for item, action in ((new_items[0], "purchase"), (new_items[1], "view")):
        expected_row[recommender.item_index[item]] += weights[action]
    (folded_user,) = recommender._users([user_id])
    row = recommender.user_rows([folded_user]).toarray().ravel()
    np.testing.assert_allclose(row, expected_row, rtol=1e-6)
    stored = recommender.state.vectors("v1", [user_id])[user_id]
    np.testing.assert_allclose(stored.vector, least_squares(bundle, expected_row), rtol=1e-4, atol=1e-5)
    assert stored.n_events == 2


def test_folding_in_a_training_users_own_history_reproduces_the_trained_vector(
    bundle: ModelBundle, make: Factory
) -> None:
    """Training ends with a CG step and then moves the item factors, so the trained vector is close to, not
    exactly, the exact solve against the final item factors."""
    recommender = make()
    users = np.arange(len(bundle.user_ids))
    solved = recommender.solve(bundle.history[users])
    trained = bundle.user_factors[users]
    cosine = (solved * trained).sum(axis=1) / np.linalg.norm(solved, axis=1) / np.linalg.norm(trained, axis=1)
    assert np.median(cosine) > 0.999 and cosine.min() > 0.99


def test_a_user_without_new_events_gets_the_batch_paths_answer(bundle: ModelBundle, make: Factory) -> None:
    recommender = make()
    for user in (0, 11, 123):
        user_id = str(bundle.user_ids[user])
        answer = recommender.recommend(user_id, 15)
        batch = bundle.recommend_ids([user_id], 15)[0]
        assert answer.strategy == "personalized"
        assert [item for item, _ in answer.items] == batch["items"]


def test_unknown_items_are_stored_but_cannot_move_the_vector(bundle: ModelBundle, make: Factory) -> None:
    recommender = make()
    user_id = str(bundle.user_ids[3])
    before = recommender.recommend(user_id, 10)
    outcome = recommender.record_events([event(user_id, "never-trained-item"), event(user_id, "99999999")])
    assert outcome.accepted == 2 and outcome.unknown_items == ["99999999", "never-trained-item"]
    assert outcome.users_updated == []
    assert len(recommender.state.events([user_id])[user_id]) == 2  # stored for the next training
    assert recommender.state.vectors("v1", [user_id]) == {}  # nothing to fold: the trained vector stays
    assert recommender.recommend(user_id, 10) == before


def test_seen_items_never_come_back(bundle: ModelBundle, make: Factory) -> None:
    recommender = make()
    user = 21
    user_id = str(bundle.user_ids[user])
    had = set(bundle.item_ids[bundle.history[user].indices])
    first = [item for item, _ in recommender.recommend(user_id, 30).items]
    assert not had & set(first)
    recommender.record_events([event(user_id, item, "view") for item in first[:3]])
    second = [item for item, _ in recommender.recommend(user_id, 30).items]
    assert not (had | set(first[:3])) & set(second)
    everything = [item for item, _ in recommender.recommend(user_id, 200, exclude_seen=False).items]
    assert had & set(everything)  # the exclusion is what keeps them out


def test_an_unknown_user_gets_popular_items_until_it_has_history(bundle: ModelBundle, make: Factory) -> None:
    recommender = make()
    answer = recommender.recommend("stranger", 10)
    assert answer.strategy == "popular"
    assert [item for item, _ in answer.items] == [str(i) for i in bundle.item_ids[bundle.popular_order[:10]]]
    liked = str(bundle.item_ids[bundle.popular_order[0]])
    recommender.record_events([event("stranger", liked)])
    folded = recommender.recommend("stranger", 10)
    assert folded.strategy == "personalized" and liked not in [item for item, _ in folded.items]


def test_after_a_purchase_items_similar_to_it_rise(bundle: ModelBundle, make: Factory) -> None:
    recommender = make()
    risen = 0
    for user in range(0, 300, 50):
        user_id = str(bundle.user_ids[user])
        (bought,) = unseen_items(bundle, user, 1)
        similar = {item for item, _ in recommender.similar(bought, 10) or []}
        before = {item for item, _ in recommender.recommend(user_id, 20).items}
        recommender.record_events([event(user_id, bought)])
        after = {item for item, _ in recommender.recommend(user_id, 20).items}
        assert bought not in after
        assert len(similar & after) >= len(similar & before)
        risen += len(similar & after) > len(similar & before)
    assert risen >= 5


def test_the_order_of_events_within_a_batch_does_not_matter(bundle: ModelBundle, make: Factory) -> None:
    user_id = str(bundle.user_ids[42])
    items = unseen_items(bundle, 42, 4)
    actions = ("view", "click", "purchase", "view")
    events = [event(user_id, item, action) for item, action in zip(items, actions, strict=True)]
    events.append(event("newcomer", items[0], "add_to_cart"))
    one, other = make("one.jsonl"), make("other.jsonl")
    one.record_events(events)
    other.record_events(events[::-1])
    for user in (user_id, "newcomer"):
        a, b = one.recommend(user, 20), other.recommend(user, 20)
        assert [i for i, _ in a.items] == [i for i, _ in b.items]
        np.testing.assert_allclose([s for _, s in a.items], [s for _, s in b.items], rtol=1e-5)


def test_a_replayed_event_is_a_duplicate_and_changes_nothing(bundle: ModelBundle, make: Factory) -> None:
    recommender = make()
    user_id = str(bundle.user_ids[5])
    batch = [event(user_id, unseen_items(bundle, 5, 1)[0])]
    assert recommender.record_events(batch).duplicates == 0
    first = recommender.recommend(user_id, 10)
    assert recommender.record_events(batch).duplicates == 1
    assert recommender.recommend(user_id, 10) == first


def test_invalid_events_are_rejected_with_the_stores_reasons(make: Factory) -> None:
    outcome = make().record_events(
        [event("u", "i", "clik"), event("", "i"), event("u", "i", timestamp="2024-01-01T00:00:00"), event("u", "i")]
    )
    assert outcome.accepted == 1
    assert [(r.record, r.code) for r in outcome.rejected] == [
        (1, "unknown_action"),
        (2, "empty_id"),
        (3, "naive_timestamp"),
    ]
    assert "clik" in outcome.rejected[0].reason


def test_request_events_shape_one_answer_and_are_not_stored(bundle: ModelBundle, make: Factory) -> None:
    recommender = make()
    liked = str(bundle.item_ids[bundle.popular_order[3]])
    recent, rejected = recommender.validate_recent("visitor", [{"item_id": liked, "action": "click", "timestamp": NOW}])
    assert rejected == []
    answer = recommender.recommend("visitor", 10, recent=recent)
    assert answer.strategy == "personalized" and liked not in [i for i, _ in answer.items]
    assert recommender.state.events(["visitor"]) == {}
    assert recommender.recommend("visitor", 10).strategy == "popular"


def test_the_rankers_user_and_item_features_see_the_new_events(bundle: ModelBundle, make: Factory) -> None:
    recommender = make()
    user = 8
    user_id = str(bundle.user_ids[user])
    item = unseen_items(bundle, user, 1)[0]
    recommender.record_events([event(user_id, item, "add_to_cart")])
    (state_user,) = recommender._users([user_id])
    view = recommender.refresh_items()
    ctx = recommender._context(view, state_user)
    cart, index = bundle.actions.index("add_to_cart"), recommender.item_index[item]
    assert ctx.recent_items[0, 0] == index
    assert ctx.user_action_counts[0, cart] == bundle.context.user_action_counts[user, cart] + 1
    assert ctx.user_n_items[0] == bundle.context.user_n_items[user] + 1
    assert ctx.ref_time[0] == view.moment == datetime.fromisoformat(NOW).timestamp() + 1  # as of the newest event
    assert ctx.user_last_ts[0] == float(datetime.fromisoformat(NOW).timestamp())  # recency 0 then
    assert ctx.item_action_counts[index, cart] == bundle.context.item_action_counts[index, cart] + 1
    assert view.events == 1 and len(ctx.item_keys) == len(bundle.context.item_keys) + 1


def test_popularity_follows_every_users_events_since_the_model(bundle: ModelBundle, make: Factory) -> None:
    """An item that many users buy after the model was trained leads the popular answer from then on, for
    users the service has never seen; events of one user counted once each, as training counts them."""
    recommender = make()
    order = bundle.popular_order
    rising = str(bundle.item_ids[order[len(order) // 2]])
    assert recommender.recommend("newcomer", 5).items[0][0] != rising
    weight = bundle.action_weights[bundle.actions.index("purchase")]
    buyers = int(bundle.popularity.max() / weight) + 2
    recommender.record_events([event(f"buyer{n}", rising, "purchase") for n in range(buyers)])
    recommender.refresh_items()
    answer = recommender.recommend("newcomer", 5)
    assert answer.strategy == "popular" and answer.items[0][0] == rising
    assert recommender.items.events == buyers


def test_the_item_view_adds_what_changed_and_equals_one_computed_from_every_event_held(
    bundle: ModelBundle, make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refreshed after each round of events, the item view adds only the events each user added after those it
    counts, and is rebuilt from everyone's when a user's events were not only added to (here an event older than
    the user's others): either way the view a restarted worker computes from every event held."""
    recommender = make()
    rebuilt = []
    rebuild = recommender._rebuilt_view
    monkeypatch.setattr(recommender, "_rebuilt_view", lambda: rebuilt.append(1) or rebuild())
    known = [str(u) for u in bundle.user_ids[:3]]
    items = [str(i) for i in bundle.item_ids[:6]]
    day = int(datetime.fromisoformat(NOW).timestamp()) - 10 * 86_400
    rounds = [
        [event(known[0], items[0], "view", day), event("new1", items[1], "purchase", day + 60)],
        [event(known[0], items[2], "add_to_cart", day + 120), event(known[1], items[0], "view", day + 30)],
        [event("new1", items[3], "click", day + 200), event("new2", items[4], "view", day + 300)],
        [event(known[0], items[5], "purchase", day - 3600)],  # before that user's other events: a rebuild
        [event(known[2], items[1], "purchase", day + 400), event(known[0], items[4], "view", day + 500)],
    ]
    for number, batch in enumerate(rounds):
        recommender.record_events(batch)
        view = recommender.refresh_items()
        assert len(rebuilt) == (1 if number >= 3 else 0)
    assert view.events == sum(len(batch) for batch in rounds)
    recommender.state.close()
    restarted = make()
    restarted.prune_state()
    restarted.refresh_items()
    fresh = restarted.items
    assert fresh.moment == view.moment == day + 501
    np.testing.assert_array_equal(fresh.bundle.popularity, view.bundle.popularity)
    for name in ("item_keys", "item_first_ts", "item_action_counts", "transition_keys", "transition_counts",
                 "item_out_counts"):  # fmt: skip
        np.testing.assert_array_equal(getattr(fresh.bundle.context, name), getattr(view.bundle.context, name), name)
    assert len(view.bundle.context.item_keys) == len(bundle.context.item_keys) + view.events


def test_events_a_failed_item_refresh_did_not_count_are_counted_by_the_next(
    bundle: ModelBundle, make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    recommender = make()
    recommender.record_events([event(str(bundle.user_ids[0]), str(bundle.item_ids[0]))])
    adding = online.with_events

    def broken(*args: object) -> object:
        raise MemoryError("no room for the item keys")

    monkeypatch.setattr(online, "with_events", broken)
    with pytest.raises(MemoryError):
        recommender.refresh_items()
    assert recommender.items.events == 0  # the view stays as it was
    monkeypatch.setattr(online, "with_events", adding)
    assert recommender.refresh_items().events == 1


def test_a_request_starts_the_item_refresh_on_a_thread_and_a_slow_one_spaces_the_next(
    bundle: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = LocalUserState(tmp_path / "state.jsonl")
    recommender = OnlineRecommender(bundle, "v1", state, EventSettings(), item_stats_seconds=0.01)
    recommender.record_events([event(f"buyer{n}", str(bundle.item_ids[0])) for n in range(3)])
    assert recommender.items.events == 0
    recommender.recommend("newcomer", 5)  # answers with the view as it is, and starts the refresh
    deadline = time.monotonic() + 10
    while recommender.items.events != 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    slow = recommender.refresh_items

    def refresh() -> object:
        time.sleep(0.2)
        return slow()

    monkeypatch.setattr(recommender, "refresh_items", refresh)
    while recommender._refreshing.locked() or time.monotonic() < recommender._due:
        time.sleep(0.01)
    began = time.monotonic()
    recommender.recommend("newcomer", 5)
    while time.monotonic() < began + 0.5:  # the slow refresh has ended
        time.sleep(0.05)
    assert recommender._due >= began + 10 * 0.2  # ten times the refresh's time, not item_stats_seconds
    state.close()


class _UnreachableAtFirst(LocalUserState):
    """A local state whose change feed cannot be reached the first time (Redis down while a version loads)."""

    reached = False

    def changes(self, cursor: str | None) -> tuple[list[str] | None, str]:
        if not self.reached:
            self.reached = True
            raise UserStateUnavailableError("down")
        return super().changes(cursor)


def test_a_version_loaded_while_the_state_was_down_reads_every_user_once_it_is_back(
    bundle: ModelBundle, tmp_path: Path
) -> None:
    state = _UnreachableAtFirst(tmp_path / "state.jsonl")
    state.add_events({"earlier": [UserEvent.of("e1", str(bundle.item_ids[0]), "purchase", 1_795_000_000, 0.0)]})
    recommender = OnlineRecommender(bundle, "v1", state, EventSettings())  # does not fail on the feed
    assert recommender.refresh_items().events == 1
    state.close()


def test_every_workers_events_reach_the_other_workers_item_statistics(bundle: ModelBundle) -> None:
    """Two workers sharing the user state in the real Redis (127.0.0.1:6379): what one receives moves the
    other's popularity at its next refresh, each user counted once however many workers read it."""
    prefix = f"recflow-test:{uuid.uuid4().hex}:"
    states = [RedisUserState(REDIS_URL, prefix) for _ in range(2)]
    try:
        receiving, answering = (OnlineRecommender(bundle, "v1", s, EventSettings(), item_stats_seconds=0)
                                for s in states)  # fmt: skip
        order = bundle.popular_order
        rising = str(bundle.item_ids[order[len(order) // 2]])
        weight = bundle.action_weights[bundle.actions.index("purchase")]
        buyers = int(bundle.popularity.max() / weight) + 2
        receiving.record_events([event(f"buyer{n}", rising, "purchase") for n in range(buyers)])
        answering.refresh_items()
        receiving.record_events([event("buyer0", rising, "purchase")])  # a replay: no new event
        answering.refresh_items()
        assert answering.items.events == buyers
        assert answering.recommend("newcomer", 5).items[0][0] == rising
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        client.delete(*client.scan_iter(match=f"{prefix}*"), states[0].changes_key)
        client.close()
        for state in states:
            state.close()


def test_user_state_survives_a_restart_and_skips_a_torn_line(bundle: ModelBundle, make: Factory) -> None:
    recommender = make()
    user_id = str(bundle.user_ids[9])
    recommender.record_events([event(user_id, item) for item in unseen_items(bundle, 9, 2)])
    recommender.refresh_items()
    answer = recommender.recommend(user_id, 10)
    recommender.state.close()
    with (recommender.state.path).open("a") as log:
        log.write('{"user_id": "torn", "eve')  # a crash in the middle of a write
    restarted = make()
    assert len(restarted.state.events([user_id])[user_id]) == 2
    restarted.prune_state()  # as the service does on loading a version: its scan notes the events held
    restarted.refresh_items()
    assert restarted.recommend(user_id, 10) == answer
    restarted.record_events([event(user_id, unseen_items(bundle, 9, 3)[2])])  # appended after the torn line
    restarted.state.close()
    assert len(make().state.events([user_id])[user_id]) == 3


def test_similar_items_exclude_the_item_and_unknown_items_get_none(bundle: ModelBundle, make: Factory) -> None:
    recommender = make()
    item = str(bundle.item_ids[bundle.popular_order[0]])
    similar = recommender.similar(item, 5)
    assert similar is not None and len(similar) == 5 and item not in [i for i, _ in similar]
    assert [s for _, s in similar] == sorted((s for _, s in similar), reverse=True)
    assert recommender.similar("no-such-item", 5) is None


def test_without_a_ranker_the_answer_is_als_alone(bundle: ModelBundle, tmp_path: Path) -> None:
    als_only = dataclasses.replace(bundle, ranker=None)
    state = LocalUserState(tmp_path / "als.jsonl")
    recommender = OnlineRecommender(als_only, "als", state, EventSettings())
    user_id = str(bundle.user_ids[12])
    answer = recommender.recommend(user_id, 10)
    assert [item for item, _ in answer.items] == als_only.recommend_ids([user_id], 10)[0]["items"]
    state.close()


def top_items(answer: Recommendation) -> list[str]:
    return [item for item, _ in answer.items]


def test_events_that_arrived_after_the_snapshot_but_before_deploy_are_folded_in(
    bundle: ModelBundle, make: Factory
) -> None:
    """Regression (issue 11): the cut was the wall-clock training time, so an event received before training
    ended but not in its data was neither in the model nor folded in. Nor is a late event (older than the
    user's last trained event) lost: neither is in the training data."""
    recommender = make()
    user = 14
    user_id = str(bundle.user_ids[user])
    new_item, late_item = unseen_items(bundle, user, 2)
    late = int(bundle.context.user_last_ts[user]) - 86_400
    received = datetime.fromisoformat(bundle.info["trained_at"]).timestamp() - 3_600  # before the model was built
    outcome = recommender.record_events(
        [event(user_id, new_item), event(user_id, late_item, timestamp=late)], now=received
    )
    assert outcome.users_updated == [user_id]
    (state_user,) = recommender._users([user_id])
    assert len(state_user.events) == 2  # still held: the model was not trained on them
    row = recommender.user_rows([state_user]).toarray().ravel()
    trained = bundle.history[user].toarray().ravel()
    for item in (new_item, late_item):
        assert trained[recommender.item_index[item]] == 0 and row[recommender.item_index[item]] > 0
    assert recommender.state.vectors("v1", [user_id])[user_id].n_events == 2


def test_an_event_the_model_was_trained_on_is_counted_once_and_pruned(bundle: ModelBundle, make: Factory) -> None:
    recommender = make()
    user = 21
    user_id = str(bundle.user_ids[user])
    assert bundle.events is not None
    last = np.flatnonzero(bundle.events.user_idx == user)[-1]  # the user's last training event, sent again
    item = str(bundle.item_ids[bundle.events.item_idx[last]])
    action = bundle.actions[bundle.events.action_idx[last]]
    outcome = recommender.record_events([event(user_id, item, action, int(bundle.events.ts[last]))])
    assert outcome.accepted == 1 and outcome.users_updated == []  # nothing new to fold in
    assert recommender.state.events([user_id]) == {}  # pruned as soon as it was read
    assert top_items(recommender.recommend(user_id, 15)) == bundle.recommend_ids([user_id], 15)[0]["items"]


def retrain_with(settings: Settings, records: list[dict[str, object]], folder: Path) -> ModelBundle:
    """The next training: the project's event store plus `records`, trained in `folder`."""
    paths = {name: folder / name for name in ("store", "rejected", "features", "models")}
    shutil.copytree(settings.paths.store, paths["store"])
    settings = settings.replace("paths", **paths)
    lines = "\n".join(json.dumps(record) for record in records).encode()
    report = ingest_json_lines(lines, source="served", store=paths["store"], rejected=paths["rejected"],
                               settings=settings.events)  # fmt: skip
    assert report.stored == len(records)
    build_features(paths["store"], paths["features"], settings)
    train(paths["features"], paths["models"], settings)
    return ModelBundle.load(paths["models"] / BUNDLE_DIR)


def test_after_a_version_trained_on_a_users_events_the_state_drops_them_and_still_excludes_their_items(
    project: tuple[Settings, Path], bundle: ModelBundle, tmp_path: Path
) -> None:
    user_id = str(bundle.user_ids[5])
    items = unseen_items(bundle, 5, 2)
    records = [event(user_id, items[0], "purchase"), event(user_id, items[1], "add_to_cart")]
    state = LocalUserState(tmp_path / "state.jsonl")
    served = OnlineRecommender(bundle, "v1", state, EventSettings())
    assert served.record_events(records).users_updated == [user_id]
    shutil.copy(state.path, tmp_path / "unswept.jsonl")  # the same state, for a reader that finds it first
    newer = retrain_with(project[0], records, tmp_path / "next")
    batch = newer.recommend_ids([user_id], 20)[0]["items"]
    assert not set(items) & set(batch)  # the new version has them in the user's training row

    swept = OnlineRecommender(newer, "v2", state, EventSettings())
    assert swept.prune_state() == 2  # as the service does when it starts serving v2
    assert state.events([user_id]) == {} and state.vectors("v1", [user_id]) == {}
    # counted once: with nothing left to fold in, the answer is the batch path's from the trained row
    assert top_items(swept.recommend(user_id, 20)) == batch
    state.close()
    restarted = LocalUserState(state.path)
    assert restarted.events([user_id]) == {}  # and so after a restart
    restarted.close()

    unswept = LocalUserState(tmp_path / "unswept.jsonl")
    lazy = OnlineRecommender(newer, "v2", unswept, EventSettings())
    assert top_items(lazy.recommend(user_id, 20)) == batch  # a read before the sweep counts them once too
    assert unswept.events([user_id]) == {}  # and prunes them
    unswept.close()


def test_a_ranker_trained_on_other_features_is_refused_with_what_to_do(
    project: tuple[Settings, Path], tmp_path: Path
) -> None:
    """A bundle whose ranker was trained on another feature set (an earlier recflow's) is not scored with features
    it never saw: loading it says to train again."""
    copy = tmp_path / "bundle"
    shutil.copytree(project[1], copy)
    ranker = copy / "ranker.txt"
    assert ranker.exists()
    ranker.write_text(ranker.read_text().replace("item_item_rank", "item_item_old", 1))
    with pytest.raises(ModelNotFoundError, match="train it again"):
        ModelBundle.load(copy)
