"""The train stage chooses what it serves on validation: never a model validation found worse than a simpler one.

Small data of four shapes (dense taste groups, dormant users, no usable time, one-event sessions) go through the
library's own stages (ingest, features, train, evaluate --holdout); the served model must beat popularity where
the data has structure, and popularity must serve where it has none.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from recflow.config import GenerateSettings, Settings, load_settings
from recflow.events.fileio import write_events
from recflow.events.synth import generate_events
from recflow.model import selection, training
from recflow.model.bundle import ModelBundle
from recflow.model.evaluate import SERVED, evaluate, evaluate_holdout
from recflow.model.features import SECONDS_PER_DAY, Interactions, build_features, encode_events, load_interactions
from recflow.model.recommend import recommend_as_of
from recflow.model.training import BUNDLE_DIR, _profile, train
from recflow.store.eventstore import ingest_files

from ..conftest import REPO
from ..factories import ACTIONS, DAY0, event_table

DAY_MS = 86_400_000
FAST = {
    "als": {"factors": 16, "iterations": 8, "tune": {"max_trials": 2}},
    "ranker": {"n_estimators": 60, "max_train_users": 2000},
    "selection": {"half_lives_days": [0, 30], "ease_lambdas": [50], "global_folds": 2},
}


def settings_for(root: Path, **changes: dict) -> Settings:
    settings = load_settings(REPO / "params.yaml")
    for section, values in {**FAST, **changes}.items():
        current = getattr(settings, section)
        nested = {k: type(getattr(current, k))(**{**getattr(current, k).__dict__, **v}) if isinstance(v, dict) else v
                  for k, v in values.items()}  # fmt: skip
        settings = settings.replace(section, **{k: tuple(v) if isinstance(v, list) else v for k, v in nested.items()})
    paths = {name: root / name for name in ("inbox", "store", "rejected", "features", "models", "reports")}
    return settings.replace("paths", **paths)


def split_last(table: pa.Table, share: float = 0.2) -> tuple[pa.Table, pa.Table]:
    """Each user's last `share` of events (at least one of two or more) held out, as the scorecard cuts."""
    frame = table.to_pandas().sort_values(["user_id", "timestamp"], kind="stable")
    position = frame.groupby("user_id").cumcount()
    size = frame.groupby("user_id")["user_id"].transform("size")
    held = position >= np.maximum(np.ceil(size * (1 - share)), 1)
    return (
        pa.Table.from_pandas(frame[~held], preserve_index=False),
        pa.Table.from_pandas(frame[held], preserve_index=False),
    )


def run(root: Path, train_table: pa.Table, holdout: pa.Table, settings: Settings) -> tuple[str, dict]:
    """ingest -> features -> train -> evaluate --holdout; returns the served kind and the holdout metrics."""
    write_events(train_table, root / "train.parquet")
    write_events(holdout, root / "holdout.parquet")
    ingest_files([root / "train.parquet"], store=settings.paths.store, rejected=settings.paths.rejected,
                 settings=settings.events)  # fmt: skip
    build_features(settings.paths.store, settings.paths.features, settings)
    report = train(settings.paths.features, settings.paths.models, settings)
    result = evaluate_holdout(root / "holdout.parquet", settings.paths.models, settings)
    return report.kind, result.metrics


def taste_groups(seed: int = 3) -> pa.Table:
    conf = GenerateSettings(seed=seed, users=500, items=200, events=25_000, days=40, groups=5)
    return generate_events(conf)


def test_dense_taste_groups_serve_a_personal_model_that_beats_popularity(tmp_path: Path) -> None:
    history, holdout = split_last(taste_groups())
    settings = settings_for(tmp_path)
    kind, metrics = run(tmp_path, history, holdout, settings)
    assert kind != "popularity"
    assert metrics[SERVED]["ndcg@10"] > 1.2 * metrics["popularity"]["ndcg@10"]
    # no sample was drawn: the deployable's choice is made again on all events (denser folds), all of it, since the
    # first selection's folds judged fewer than selection.max_users users
    report = json.loads((settings.paths.models / "train_report.json").read_text())
    assert report["backtest"]["deployable"] == "chosen again on all events" and "select bundle" in report["seconds"]
    assert "ease" in report["validation"]  # 200 items: EASE's matrices are well inside selection.ease_max_gb
    # when the two choices differ, the test window's evaluation says that it scores the backtest's, not what serves
    models = settings.paths.models
    meta = json.loads((models / BUNDLE_DIR / "bundle.json").read_text())
    other = "popularity" if report["backtest"]["kind"] != "popularity" else "als"
    (models / BUNDLE_DIR / "bundle.json").write_text(json.dumps({**meta, "kind": other}))
    scored = evaluate(settings.paths.features, models, tmp_path / "reports", settings)
    assert any(
        w.startswith(f"the deployable model serves {other}, chosen again on all events") for w in scored.warnings
    )


def test_ease_is_skipped_when_its_matrices_exceed_the_memory_budget(tmp_path: Path) -> None:
    """One fold (no usable time) of 199 items: EASE needs two 199 x 199 float32 matrices, 316,808 bytes."""
    table = taste_groups(7)
    one_time = pa.array(np.full(table.num_rows, table["timestamp"].cast(pa.int64()).to_numpy().max()), pa.int64())
    table = table.set_column(table.schema.get_field_index("timestamp"), "timestamp",
                             one_time.cast(table["timestamp"].type))  # fmt: skip
    settings = settings_for(tmp_path, selection={"ease_max_gb": 0.00031})
    write_events(table, tmp_path / "train.parquet")
    ingest_files([tmp_path / "train.parquet"], store=settings.paths.store, rejected=settings.paths.rejected,
                 settings=settings.events)  # fmt: skip
    build_features(settings.paths.store, settings.paths.features, settings)
    report = train(settings.paths.features, settings.paths.models, settings)
    assert "ease" not in report.validation and report.kind != "ease"
    skipped = [w for w in report.warnings if w.startswith("EASE skipped")]
    assert len(skipped) == 1 and "GB for 2 item x item matrices > selection.ease_max_gb=0.00031" in skipped[0]


def test_dormant_users_keep_their_history(tmp_path: Path) -> None:
    """Two thirds of the users stopped a year before the data ends: decay from each user's own last event keeps
    their rows, so the served model still beats popularity for them."""
    table = taste_groups(5)
    users = table["user_id"].to_pylist()
    dormant = np.array([zlib.crc32(u.encode()) % 3 != 0 for u in users])  # not hash(): salted per process
    stamps = table["timestamp"].cast(pa.int64()).to_numpy()
    shifted = np.where(dormant, stamps - 365 * DAY_MS, stamps)
    table = table.set_column(table.schema.get_field_index("timestamp"), "timestamp",
                             pa.array(shifted, pa.int64()).cast(table["timestamp"].type))  # fmt: skip
    history, holdout = split_last(table)
    kind, metrics = run(tmp_path, history, holdout, settings_for(tmp_path))
    assert kind != "popularity"
    assert metrics[SERVED]["ndcg@10"] > 1.2 * metrics["popularity"]["ndcg@10"]


def test_without_usable_time_validation_holds_out_at_random(tmp_path: Path) -> None:
    """Every event at one import time: the profile says time carries nothing, folds are random per user."""
    table = taste_groups(7)
    one_time = pa.array(np.full(table.num_rows, table["timestamp"].cast(pa.int64()).to_numpy().max()), pa.int64())
    table = table.set_column(table.schema.get_field_index("timestamp"), "timestamp",
                             one_time.cast(table["timestamp"].type))  # fmt: skip
    rng = np.random.default_rng(0)
    held = rng.random(table.num_rows) < 0.2
    settings = settings_for(tmp_path)
    kind, metrics = run(tmp_path, table.filter(pa.array(~held)), table.filter(pa.array(held)), settings)
    report = (settings.paths.models / "train_report.json").read_text()
    assert '"time_informative": false' in report and '"protocol": "user_random"' in report
    assert kind != "popularity"
    assert metrics[SERVED]["ndcg@10"] > metrics["popularity"]["ndcg@10"]


def test_one_event_sessions_are_answered_from_item_to_item_structure(tmp_path: Path) -> None:
    """Sessions of 2-4 clicks within one taste group; the held-out users show one click. An item-to-item model
    (or the two-stage model with its item-item candidates) must beat popularity from that single click."""
    rng = np.random.default_rng(11)
    rows = []
    start = 1_700_000_000_000
    for session in range(4000):
        group = rng.integers(0, 8)
        clicks = rng.choice(np.arange(group * 25, group * 25 + 25), size=rng.integers(2, 5), replace=False)
        for j, item in enumerate(clicks):
            rows.append((f"s{session}", f"i{item}", "click", start + session * 60_000 + j * 1000))
    users, items, actions, stamps = zip(*rows, strict=True)
    table = pa.table({"user_id": users, "item_id": items, "action": actions,
                      "timestamp": pa.array(stamps, pa.int64()).cast(pa.timestamp("ms", tz="UTC"))})  # fmt: skip
    frame = table.to_pandas()
    first = frame.groupby("user_id").cumcount() == 0
    late = frame["user_id"].str[1:].astype(int) >= 3500  # test sessions: their first click is known, the rest held
    history = pa.Table.from_pandas(frame[~late | first], preserve_index=False)
    holdout = pa.Table.from_pandas(frame[late & ~first], preserve_index=False)
    kind, metrics = run(tmp_path, history, holdout, settings_for(tmp_path))
    assert kind != "popularity"
    assert metrics[SERVED]["ndcg@10"] > 2 * metrics["popularity"]["ndcg@10"]


def test_random_interactions_serve_popularity(tmp_path: Path) -> None:
    """Users pick items independently from one skewed distribution: nothing personal to learn, so no model beats
    popularity on validation and popularity serves, with the reason recorded."""
    rng = np.random.default_rng(2)
    weights = 1.0 / np.arange(1, 201) ** 1.1
    n = 20_000
    users = rng.integers(0, 800, n)
    items = rng.choice(200, size=n, p=weights / weights.sum())
    stamps = 1_700_000_000_000 + np.sort(rng.integers(0, 40 * DAY_MS, n))
    table = pa.table({"user_id": [f"u{u}" for u in users], "item_id": [f"i{i}" for i in items],
                      "action": ["view"] * n,
                      "timestamp": pa.array(stamps, pa.int64()).cast(pa.timestamp("ms", tz="UTC"))})  # fmt: skip
    history, holdout = split_last(table)
    settings = settings_for(tmp_path)
    kind, _ = run(tmp_path, history, holdout, settings)
    assert kind == "popularity"
    assert "popularity serves" in (settings.paths.models / "train_report.json").read_text()


def test_a_ranker_that_learned_nothing_is_switched_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shuffled labels teach the ranker noise: validation finds it worse than its own candidates, so it is not
    what serves."""
    original = selection.grade_labels

    def shuffled(*args: object) -> np.ndarray:
        labels = original(*args)
        return np.random.default_rng(0).permutation(labels)

    monkeypatch.setattr(selection, "grade_labels", shuffled)
    history, holdout = split_last(taste_groups())
    settings = settings_for(tmp_path)
    kind, _ = run(tmp_path, history, holdout, settings)
    assert kind != "als_ranker"
    report = (settings.paths.models / "train_report.json").read_text()
    assert "the ranker did not beat its candidates" in report


def test_the_ranker_learns_from_the_unjudged_users_too_and_once_chosen_from_every_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ranker learns from the tuning users and from the users past selection.max_users, whom nothing judges;
    once the two-stage model is chosen, from the selecting users too (they were held out only to make the choice),
    with the chosen settings: more queries than the ranker that was compared. Each fold user's candidates are built
    once for the ranker (the refit reuses the tuning users' rows), and the backtest
    that `evaluate` scores is chosen the same way before the test window. The deployable's choice is made again on
    all events even when the first selection's folds were full (here 150 users, selection.max_users): its folds are
    then nearer the data the served model is fitted on; the decay and ALS's parameters are kept."""
    built: list[int] = []
    candidate_set = ModelBundle.candidate_set

    def counted(self: ModelBundle, users: np.ndarray) -> object:
        built.append(len(users))
        return candidate_set(self, users)

    def marked(*args: object, **kwargs: object) -> object:
        built.append(-1)  # where each selection starts
        return selection.select(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ModelBundle, "candidate_set", counted)
    monkeypatch.setattr(training, "select", marked)
    history, holdout = split_last(taste_groups())
    settings = settings_for(tmp_path, selection={"models": ["als_ranker"], "max_users": 150})
    kind, _ = run(tmp_path, history, holdout, settings)
    assert kind == "als_ranker"
    report = json.loads((settings.paths.models / "train_report.json").read_text())
    ranker = report["ranker"]
    compared = ranker["train_queries"] + ranker["validation_queries"]
    refit = ranker["refit_on_all_fold_users"]
    folds = report["folds"]
    # the compared ranker learned from the tuning users and the users past selection.max_users (never judged)
    assert compared > 2 * sum(f["tune_users"] for f in folds) and all(f["ranker_only_users"] > 0 for f in folds)
    assert refit["train_queries"] + refit["validation_queries"] > compared + 0.8 * sum(f["select_users"] for f in folds)
    deployable = built[len(built) - built[::-1].index(-1) :]  # the last selection's candidate sets
    assert sum(deployable) == sum(f["tune_users"] + f["select_users"] + f["ranker_only_users"] for f in folds)
    # chosen again on all events, keeping the decay and ALS parameters of the first selection (its folds were full),
    # whose trials the report shows
    assert report["backtest"]["deployable"] == "chosen again on all events (the decay and ALS's parameters kept)"
    assert "select bundle" in report["seconds"] and report["backtest"]["kind"] == kind
    for kept in ("half_life_days", "als"):
        assert report["choices"][kept] == report["backtest"]["choices"][kept]
    assert len(report["trials"]["als"]) > 1 and len(report["trials"]["half_life_days"]) > 1


def test_answers_as_of_a_moment_never_see_a_later_event(tmp_path: Path) -> None:
    """Known answer for `recommend --as-of`: deleting every event after the moment from the model's history changes
    nothing in the answers as of that moment; and an item the user first had after it may be recommended."""
    history, holdout = split_last(taste_groups(9))
    settings = settings_for(tmp_path)
    run(tmp_path, history, holdout, settings)
    bundle = ModelBundle.load(settings.paths.models / BUNDLE_DIR)
    assert bundle.events is not None
    moment = float(np.quantile(bundle.events.ts, 0.7))
    users = [str(u) for u in bundle.user_ids[:60]]
    moments = np.full(len(users), moment)
    answers = recommend_as_of(bundle, users, 20, moments)
    earlier = dataclasses.replace(bundle, events=bundle.events.where(bundle.events.ts < moment))
    assert recommend_as_of(earlier, users, 20, moments) == answers
    later_items = set()
    for answer in answers:
        user = bundle.user_index[answer["user_id"]]
        mine = bundle.events.user_idx == user
        before = set(bundle.item_ids[bundle.events.item_idx[mine & (bundle.events.ts < moment)]])
        assert not before & set(answer["items"]), "an item the user had before the moment came back"
        later_items |= set(bundle.item_ids[bundle.events.item_idx[mine & (bundle.events.ts >= moment)]]) & set(
            answer["items"]
        )
    assert later_items, "items first had after the moment are candidates as of it"


def test_the_gap_to_the_best_is_paired_and_weighs_protocols_equally() -> None:
    """Known answers for the one-standard-error rule's arithmetic: per-user differences, their mean and standard
    error; a protocol with two folds counts as much as a protocol with one, and within a protocol a fold weighs
    as many users as it judged."""
    one = [SimpleNamespace(protocol="user_last")]
    gap, se = selection._paired_gap([np.array([1.0, 1, 1, 1])], [np.array([0.0, 1, 0, 1])], one)  # type: ignore[arg-type]
    assert gap == pytest.approx(0.5) and se == pytest.approx(np.sqrt(1 / 12))
    same = [np.array([0.3, 0.1, 0.7])]
    assert selection._paired_gap(same, same, one) == (0.0, 0.0)  # type: ignore[arg-type]
    three = [SimpleNamespace(protocol="global_time")] * 2 + [SimpleNamespace(protocol="user_last")]
    best = [np.ones(4), np.ones(4), np.ones(4)]
    other = [np.zeros(4), np.ones(4), np.ones(4)]  # behind by 1 in one of the two global folds only
    gap, _ = selection._paired_gap(best, other, three)  # type: ignore[arg-type]
    assert gap == pytest.approx(0.25)  # (mean of 1 and 0) / 2 protocols
    two = [SimpleNamespace(protocol="global_time")] * 2
    best, other = [np.ones(4), np.ones(1)], [np.array([0.0, 0, 1, 1]), np.zeros(1)]
    gap, se = selection._paired_gap(best, other, two)  # type: ignore[arg-type]
    assert gap == pytest.approx(3 / 5)  # the 5 users' mean, not the folds' (0.5 + 1) / 2
    assert se == pytest.approx(np.sqrt(1 / 12) * 4 / 5)  # the one-user fold has no spread of its own
    assert selection._clearly_ahead([np.array([1.0, 1, 1, 1])], [np.array([0.0, 1, 0, 1])], one)  # type: ignore[arg-type]
    assert not selection._clearly_ahead([np.array([1.0, 0, 1, 0])], [np.array([0.0, 1, 0, 1])], one)  # type: ignore[arg-type]


def test_a_cut_judging_one_user_is_not_a_fold() -> None:
    """Ten events: the first global cut judges two users, the cut before it only one (who could tune or select,
    not both), so it is left out with a warning instead of scoring an empty half."""
    times = {"a": [1, 2, 3, 6, 7, 8], "b": [4, 9], "c": [5, 10]}
    rows = sorted((t, u) for u, ts in times.items() for t in ts)
    users = np.array(["a", "b", "c"], dtype=object)
    inter = Interactions(
        user_idx=np.array([list(users).index(u) for _, u in rows], np.int32),
        item_idx=np.arange(len(rows), dtype=np.int32),
        action_idx=np.zeros(len(rows), np.int8),
        ts=np.array([t * 86_400 for t, _ in rows], np.int64),
        split=np.zeros(len(rows), np.int8),
        user_ids=users,
        item_ids=np.array([f"i{i}" for i in range(len(rows))], dtype=object),
        actions=("view",),
    )
    settings = settings_for(Path("."), selection={"global_folds": 4, "min_users": 1})
    profile = SimpleNamespace(protocols=["global_time"])
    folds, warnings, _ = selection.make_folds(inter, profile, settings)  # type: ignore[arg-type]
    assert [len(f.truth.users) for f in folds] == [2]
    assert len(folds[0].tune_rows) == len(folds[0].select_rows) == 1
    assert "global_time cut 2: 1 judged user(s), too few to tune and select: not used" in warnings


def test_the_users_past_max_users_that_the_ranker_learns_from_are_bounded_by_its_max_train_users() -> None:
    """30 users with a new item in their last events, selection.max_users 10: 10 are judged; of the other 20, the
    first 5 join the ranker's learners (ranker.max_train_users 15 counts the judged ones), the rest are left out."""
    n_users, per_user = 30, 5
    user = np.repeat(np.arange(n_users), per_user)
    inter = Interactions(
        user_idx=user.astype(np.int32),
        item_idx=(np.tile(np.arange(per_user), n_users) + user % 7).astype(np.int32),
        action_idx=np.zeros(len(user), np.int8),
        ts=(np.tile(np.arange(per_user), n_users) * 86_400 + user).astype(np.int64),
        split=np.zeros(len(user), np.int8),
        user_ids=np.array([f"u{u}" for u in range(n_users)], dtype=object),
        item_ids=np.array([f"i{i}" for i in range(per_user + 7)], dtype=object),
        actions=("view",),
    )
    settings = settings_for(Path("."), selection={"max_users": 10, "min_users": 1}, ranker={"max_train_users": 15})
    folds, _, _ = selection.make_folds(inter, SimpleNamespace(protocols=["user_last"]), settings)  # type: ignore[arg-type]
    (fold,) = folds
    assert len(fold.truth.users) == n_users and fold.judged == 10
    judged = np.r_[fold.tune_rows, fold.select_rows]
    assert len(fold.spare_rows) == 5 and not np.isin(fold.spare_rows, judged).any()
    assert fold.spare_rows.tolist() == np.setdiff1d(np.arange(n_users), judged)[:5].tolist()


def test_above_sample_users_the_choice_is_made_once_on_a_sample_as_narrow_as_it(tmp_path: Path) -> None:
    """500 users, selection.sample_users 200: the folds hold the 200 sampled users only (re-indexed), the deployable
    takes the choices of the one selection, and the served model still beats popularity on held-out events."""
    history, holdout = split_last(taste_groups())
    settings = settings_for(tmp_path, selection={"sample_users": 200})
    kind, metrics = run(tmp_path, history, holdout, settings)
    report = json.loads((settings.paths.models / "train_report.json").read_text())
    assert any(w.startswith("choices made on a random sample of 200 of 500 users") for w in report["warnings"])
    assert report["backtest"]["deployable"] == "the same choices" and "select bundle" not in report["seconds"]
    assert kind != "popularity" and metrics[SERVED]["ndcg@10"] > 1.2 * metrics["popularity"]["ndcg@10"]
    inter, meta = load_interactions(settings.paths.features)
    folds, _, sampled = selection.make_folds(inter, _profile(meta, inter), settings)
    assert sampled is not None and len(sampled) == 200 and np.all(np.diff(sampled) > 0)
    assert all(f.window.history.n_users == 200 for f in folds)
    assert set(np.concatenate([f.window.history.user_ids for f in folds])) == set(inter.user_ids[sampled])


def test_a_sample_fit_is_widened_to_every_user_for_the_warm_start() -> None:
    factors = {"user_factors": np.ones((2, 2), np.float32), "item_factors": np.eye(3, 2, dtype=np.float32)}
    model = SimpleNamespace(factors=2, regularization=0.1, alpha=1.0, iterations=3, random_state=0, **factors)
    wide = selection._widened(model, np.array([1, 3]), 5)  # type: ignore[arg-type]
    assert wide.user_factors.shape == (5, 2) and wide.user_factors.dtype == np.float32
    assert np.all(wide.user_factors[[1, 3]] == 1) and np.all(wide.user_factors[[0, 2, 4]] == 0)
    assert wide.item_factors is model.item_factors and (wide.factors, wide.iterations) == (2, 3)
    assert selection._widened(model, None, 5) is model  # type: ignore[arg-type]


@pytest.mark.parametrize("window_days", [0.0, 2.0])
def test_popularity_after_a_history_is_popularity_as_of_the_history_with_the_later_events(window_days: float) -> None:
    """The service's popularity (`PopularityAfter`): the history read once, later events added at each moment,
    equal to `popularity_as_of` computed from everything."""
    rows = [("a", "x", "view", 0), ("a", "y", "purchase", 1), ("b", "x", "view", 2.5), ("c", "z", "add_to_cart", 3)]
    rows += [("b", "y", "view", 4), ("c", "x", "purchase", 5), ("d", "z", "view", 6), ("d", "z", "purchase", 7)]
    every = encode_events(event_table(rows), ACTIONS)
    weights = np.array([1.0, 2.0, 3.0, 5.0], dtype=np.float32)
    cut = DAY0 + 4 * SECONDS_PER_DAY
    history, later = every.where(every.ts < cut), every.where(every.ts >= cut)
    after = selection.PopularityAfter(history, weights, cut, window_days)
    for day in (4, 5.5, 7.5, 9):
        moment = DAY0 + day * SECONDS_PER_DAY
        shown = later.where(later.ts < moment)
        expected = selection.popularity_as_of(every.where(every.ts < moment), weights, moment, window_days)
        got = after(shown.item_idx, shown.action_idx, shown.ts, moment)
        np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=f"day {day}")


def _size_folds(tuning: int, spare: int) -> tuple[list[selection.Fold], list[SimpleNamespace]]:
    """Two folds of `tuning` judged users, all tuning users, then `spare` users past selection.max_users, and a
    stand-in bundle per fold."""
    folds, bundles = [], []
    for _ in range(2):
        users = np.arange(tuning + spare)
        truth = selection.GroundTruth(users=users, relevant=np.zeros((len(users), 1)))
        window = SimpleNamespace(history=SimpleNamespace(n_users=len(users)))
        rows = (users[:tuning], np.zeros(0, dtype=np.int64), users[tuning:])
        folds.append(selection.Fold("user_last", window, truth, *rows))  # type: ignore[arg-type]
        bundles.append(SimpleNamespace(n_candidates=0, n_popular=0, n_item_item=0, item_item="weights"))
    return folds, bundles


def _fit(fitted: np.ndarray) -> selection.RankerFit:
    return selection.RankerFit(None, 1, 0.0, {}, len(fitted), 0, fitted)  # type: ignore[arg-type]


@pytest.mark.parametrize("gain", [0.0, 0.05])
def test_served_candidate_sizes_are_chosen_on_users_the_rankers_trees_never_saw(
    monkeypatch: pytest.MonkeyPatch, gain: float
) -> None:
    """Twice the ALS candidates score `gain` higher for every user: chosen when clearly ahead, not on a tie; the
    users judging it are the tuning and spare users outside the ranker's fitted queries (fold offset + user)."""
    folds, bundles = _size_folds(40, 10)
    # fold 0: tuning users 0-29 and spare users 40-44 grew the trees; fold 1 (queries from 50): tuning users 0-9
    fitted = np.r_[np.arange(30), np.arange(40, 45), 50 + np.arange(10)]
    judged: list[np.ndarray] = []
    per_user = np.random.default_rng(0).random(50)  # users differ; a size moves every user by the same gain

    def ndcg(bundle: SimpleNamespace, truth: selection.GroundTruth, kind: str) -> np.ndarray:
        judged.append(truth.users)
        return per_user[truth.users] + (gain if bundle.n_candidates == 200 else 0.0)

    monkeypatch.setattr(selection, "_ndcg", ndcg)
    settings = Settings()
    sizes, log = selection._choose_sizes(folds, bundles, _fit(fitted), settings)  # type: ignore[arg-type]
    assert judged[0].tolist() == [*range(30, 40), *range(45, 50)] and judged[1].tolist() == list(range(10, 50))
    expected_n = 200 if gain else settings.candidates.n
    assert sizes == (expected_n, settings.candidates.popular, settings.candidates.item_item)
    assert [b.n_candidates for b in bundles] == [expected_n] * 2
    assert len(log) == 1 + 2 * 3 and log[0]["sizes"] == [100, 20, 50] and log[0]["users"] == 55


@pytest.mark.parametrize(("gains", "chosen"), [((0.0, 0.03), 16), ((0.0, 0.0), 4), ((0.02, 0.0), 4)])
def test_the_rankers_leaves_are_chosen_on_users_its_trees_never_saw(
    monkeypatch: pytest.MonkeyPatch, gains: tuple[float, float], chosen: int
) -> None:
    """ranker.num_leaves [4, 16]: each ranker is trained on the same queries and judged on the same users outside
    its fitted queries; the higher NDCG@10 wins, a tie goes to the first. The refit's leaves are the chosen ones."""
    folds, bundles = _size_folds(40, 10)
    fitted = np.r_[np.arange(30), np.arange(40, 45), 50 + np.arange(10)]
    per_user = np.random.default_rng(0).random(50)
    gain = dict(zip((4, 16), gains, strict=True))
    judged: list[np.ndarray] = []

    def train(*args: object, num_leaves: int, **kwargs: object) -> tuple[selection.RankerFit, dict[str, object]]:
        fit = selection.RankerFit(f"trees of {num_leaves}", 1, 0.0, {}, len(fitted), 0, fitted, num_leaves)  # type: ignore[arg-type]
        return fit, {"num_leaves": num_leaves}

    def ndcg(bundle: SimpleNamespace, truth: selection.GroundTruth, kind: str) -> np.ndarray:
        judged.append(truth.users)
        return per_user[truth.users] + gain[int(bundle.ranker.split()[-1])]

    monkeypatch.setattr(selection, "_train_ranker", train)
    monkeypatch.setattr(selection, "_ndcg", ndcg)
    settings = Settings().replace("ranker", num_leaves=(4, 16))
    fit, info, trials = selection._choose_ranker(folds, bundles, settings, np.ones(1), {})  # type: ignore[arg-type]
    assert fit is not None and fit.num_leaves == chosen and info == {"num_leaves": chosen}
    assert [b.ranker for b in bundles] == [f"trees of {chosen}"] * 2
    assert [t["num_leaves"] for t in trials] == [4, 16] and all(t["users"] == 55 for t in trials)
    assert [j.tolist() for j in judged[:2]] == [[*range(30, 40), *range(45, 50)], list(range(10, 50))]
    assert all(np.array_equal(a, b) for a, b in zip(judged[:2], judged[2:], strict=True))
