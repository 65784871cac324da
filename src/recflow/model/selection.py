"""Choices made by validation inside the training data, and the one function that fits a bundle.

Folds: the training events are cut again, as the held-out data will be cut (data profile, profile.py): by
global time and by each user's last events when timestamps carry information, at random per user when they
do not. Each fold's judged users are split in two, once: *tune* users choose the decay, ALS's parameters, the
popularity window, EASE's regularisation, and train the ranker (with the fold's users past
`selection.max_users`, whom nothing judges); *select* users, which nothing was fitted or tuned on, then choose the
model kind that is served: popularity, item-kNN, EASE, ALS or ALS + ranker, by the one-standard-error rule (the
simplest kind within one standard error of the best, so that a more complex model serves only when validation can
tell it from a simpler one). A chosen ranker is then refitted on every user of the folds. Every model is scored
by `model.scoring` through a bundle, the same function `recommend` and the service call, as of each fold's moment
(the end of its history). Budgets are counted in trials, so a slower machine makes the same choices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares

from recflow.config import Settings, SplitSettings
from recflow.errors import EmptyDataError
from recflow.model.bundle import ModelBundle
from recflow.model.candidates import ALSParams, ease_bytes, ease_weights, fit_als, knn_similarity, tune_als
from recflow.model.features import (
    SECONDS_PER_DAY,
    SPLIT_TEST,
    Interactions,
    Window,
    assign_split,
    confidence_matrix,
    window,
)
from recflow.model.metrics import (
    PAD,
    GroundTruth,
    ground_truth,
    grouped_bootstrap_interval,
    ndcg_per_user,
    paired_standard_error,
    recall_curve,
)
from recflow.model.profile import PROTOCOL_GLOBAL, PROTOCOL_USER, DataProfile
from recflow.model.ranker import RankerFit, action_grades, grade_labels, train_ranker
from recflow.model.ranker_features import build_context, candidate_features, feature_names
from recflow.model.scoring import (
    ITEM_ITEM_KINDS,
    KIND_ALS,
    KIND_EASE,
    KIND_ITEM_KNN,
    KIND_POPULARITY,
    KIND_TWO_STAGE,
)

logger = logging.getLogger(__name__)

K = 10  # NDCG@10 decides
SIMPLICITY = (KIND_POPULARITY, KIND_ITEM_KNN, KIND_ALS, KIND_EASE, KIND_TWO_STAGE)  # ties go to the simpler
POPULARITY_ALL_TIME_TIE = 1e-3  # items outside the popularity window keep a trace of their all-time count

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Choices:
    """Everything the served model is built with."""

    kind: str
    half_life_days: float  # 0: no decay
    als: ALSParams
    popularity_window_days: float  # 0: all time
    item_item: str | None  # "ease" or "item_knn": the item-item model (served, or a source of the two-stage)
    ease_lambda: float
    knn_weighting: str = "bm25"  # item-kNN's weighting of co-occurrence (candidates.KNN_WEIGHTINGS)
    candidates: tuple[int, int, int] | None = None  # ALS, popular, item-item candidates served (None: params.yaml's)


@dataclass(eq=False)
class Fold:
    protocol: str
    window: Window
    truth: GroundTruth  # every user of the fold with a new item in its target
    tune_rows: np.ndarray  # rows of truth: judged users that tune and train the ranker
    select_rows: np.ndarray  # rows of truth: judged users that choose the model
    # rows of truth past `selection.max_users` (not judged), the first up to `ranker.max_train_users` users in all:
    # scoring them would cost without making a choice clearer, but each is one more query the ranker learns from
    spare_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def judged(self) -> int:
        return len(self.tune_rows) + len(self.select_rows)

    def part(self, rows: np.ndarray) -> GroundTruth:
        return GroundTruth(users=self.truth.users[rows], relevant=self.truth.relevant[rows])


@dataclass
class SelectionReport:
    choices: dict[str, Any]
    folds: list[dict[str, Any]]
    models: dict[str, dict[str, Any]]  # kind -> validation NDCG@10, interval, users
    decided: str  # why the served kind was chosen
    warnings: list[str] = field(default_factory=list)
    trials: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ranker: dict[str, Any] | None = None
    als_start: AlternatingLeastSquares | None = None  # a fold's fit with the chosen parameters (warm start)
    # the choices were made on a random sample of selection.sample_users users: the deployable takes them (a second
    # selection on all events would cost as much again on the largest data)
    sampled: bool = False
    # every protocol of the profile judged selection.max_users users: all events would give the decay and ALS search
    # denser folds, not more users
    full: bool = False


PROTOCOL_METHODS = {PROTOCOL_GLOBAL: "global_time", PROTOCOL_USER: "per_user"}


def make_folds(
    history: Interactions, profile: DataProfile, settings: Settings
) -> tuple[list[Fold], list[str], np.ndarray | None]:
    """One validation fold per protocol of the profile, cut inside `history`; folds with fewer than
    `selection.min_users` judged users are dropped (with a warning), unless none has that many. Above
    `selection.sample_users` users the folds hold a sample's users only, re-indexed: the third value maps the
    folds' user indices back to `history`'s (None: the same indices)."""
    conf = settings.selection
    ranker_users = settings.ranker.max_train_users
    fraction = settings.features.split.validation_fraction
    rng = np.random.default_rng(conf.seed)
    folds: list[Fold] = []
    warnings: list[str] = []
    active = np.unique(history.user_idx)
    sampled = None
    if conf.sample_users and len(active) > conf.sample_users:
        # large data: the choices are made on a fixed random sample of users (all their events, every item), so
        # selection costs what `sample_users` users cost whatever the size of the store (its ALS fits, contexts
        # and scores are as wide as the sample, not as the store's users)
        sampled = np.sort(rng.choice(active, conf.sample_users, replace=False))
        history = history.of_users(sampled)
        warnings.append(f"choices made on a random sample of {conf.sample_users:,} of {len(active):,} users")
    for protocol in profile.protocols:
        method = PROTOCOL_METHODS.get(protocol, "random")
        split = SplitSettings(method=method, test_fraction=fraction, validation_fraction=0.0, seed=conf.seed)
        source = history
        # a global cut judges only the users active after it: earlier cuts (each moving back by as many events)
        # add users until the protocol has selection.max_users of them or `global_folds` cuts were made
        cuts_wanted = conf.global_folds if protocol == PROTOCOL_GLOBAL else 1
        judged = 0
        for cut in range(cuts_wanted):
            try:
                labels, cuts = assign_split(source, split)
                labelled = Interactions(**{**source.__dict__, "split": labels})
                win = window(labelled, SPLIT_TEST, method, cuts)
            except EmptyDataError as exc:
                warnings.append(f"{protocol} fold: {exc}")
                break
            had = confidence_matrix(win.history, np.ones(len(history.actions)), None)
            truth = ground_truth(win, had)
            judged_rows = np.arange(len(truth.users))
            if len(truth.users) > conf.max_users:
                judged_rows = np.sort(rng.choice(len(truth.users), conf.max_users, replace=False))
            n = len(judged_rows)
            if n < 2:  # a fold needs a user to tune on and another to choose with
                warnings.append(f"{protocol} cut {cut + 1}: {n} judged user(s), too few to tune and select: not used")
                break
            selecting = rng.random(n) < conf.select_share
            if selecting.all() or not selecting.any():
                selecting[:] = np.arange(n) % 2 == 0
            # the ranker learns from at most ranker.max_train_users users of a fold, judged ones included
            spare = np.setdiff1d(np.arange(len(truth.users)), judged_rows)[: max(ranker_users - n, 0)]
            folds.append(Fold(protocol, win, truth, judged_rows[~selecting], judged_rows[selecting], spare))
            judged += n
            if judged >= conf.max_users:
                break
            source = win.history
    if not folds:
        raise EmptyDataError(
            "no validation fold could be cut from the training data: it needs at least two users with events on "
            "both sides of a cut; " + "; ".join(warnings)
        )
    protocols = {f.protocol for f in folds}
    tune = {p: sum(len(f.tune_rows) for f in folds if f.protocol == p) for p in protocols}
    chosen = {p: sum(len(f.select_rows) for f in folds if f.protocol == p) for p in protocols}
    usable = {p for p in protocols if min(tune[p], chosen[p]) >= conf.min_users}
    enough = [f for f in folds if f.protocol in usable]
    for protocol in sorted(protocols - usable):
        warnings.append(
            f"{protocol} folds: {tune[protocol]} tuning and {chosen[protocol]} selecting users, fewer than "
            f"selection.min_users={conf.min_users}: not used"
        )
    if enough:
        return enough, warnings, sampled
    largest = max(folds, key=lambda f: f.judged)
    warnings.append(
        f"validation has only {largest.judged} users (< {conf.min_users} per half): the choices below are "
        "unreliable; add events, or lower selection.min_users knowingly"
    )
    return [largest], warnings, sampled


def popularity_as_of(history: Interactions, weights: np.ndarray, moment: float, window_days: float) -> np.ndarray:
    """Weighted event count per item in the window before `moment` (0: all time), plus a trace of the
    all-time count so every item with history stays recommendable and ties go to the all-time favourite."""
    values = weights[history.action_idx]
    all_time = np.bincount(history.item_idx, weights=values, minlength=history.n_items)
    if window_days <= 0:
        return all_time.astype(np.float32)
    recent = history.ts >= moment - window_days * SECONDS_PER_DAY
    windowed = np.bincount(history.item_idx[recent], weights=values[recent], minlength=history.n_items)
    return _with_trace(windowed, all_time)


def _with_trace(windowed: np.ndarray, all_time: np.ndarray) -> np.ndarray:
    trace = all_time / max(float(all_time.max(initial=0.0)), 1e-12) * POPULARITY_ALL_TIME_TIE
    return (windowed + trace).astype(np.float32)


class PopularityAfter:
    """`popularity_as_of` of a history plus later events, at moments from the history's own on, reading the
    history once: the service's popularity as events arrive. Keeps the all-time counts and the events of the
    window before `moment` (time-sorted), so a moment costs the window's events, not the history's."""

    def __init__(self, history: Interactions, weights: np.ndarray, moment: float, window_days: float) -> None:
        self.weights, self.n_items = weights, history.n_items
        self.window = window_days * SECONDS_PER_DAY
        values = weights[history.action_idx]
        self.all_time = np.bincount(history.item_idx, weights=values, minlength=self.n_items)
        recent = np.flatnonzero(history.ts >= moment - self.window) if window_days > 0 else np.zeros(0, np.int64)
        order = recent[np.argsort(history.ts[recent], kind="stable")]
        self.ts, self.items, self.values = history.ts[order], history.item_idx[order], values[order]

    def __call__(self, items: np.ndarray, actions: np.ndarray, ts: np.ndarray, moment: float) -> np.ndarray:
        """Popularity as of `moment` (not before the history's) with these later events added."""
        values = self.weights[actions]
        all_time = self.all_time + np.bincount(items, weights=values, minlength=self.n_items)
        if self.window <= 0:
            return all_time.astype(np.float32)
        start = int(np.searchsorted(self.ts, moment - self.window, side="left"))
        recent = ts >= moment - self.window
        windowed = np.bincount(self.items[start:], weights=self.values[start:], minlength=self.n_items) + np.bincount(
            items[recent], weights=values[recent], minlength=self.n_items
        )
        return _with_trace(windowed, all_time)


def fit_bundle(
    history: Interactions,
    moment: float,
    choices: Choices,
    settings: Settings,
    weights: np.ndarray,
    *,
    ranker: RankerFit | None = None,
    als_model: AlternatingLeastSquares | None = None,
    warm_start: AlternatingLeastSquares | None = None,
    item_item: sp.csr_matrix | np.ndarray | None = None,
) -> tuple[ModelBundle, AlternatingLeastSquares]:
    """The one way a bundle is built (validation folds, backtest, deployable): `history` weighted with the
    chosen decay, ALS (given, warm-started, or fitted), popularity and item-item weights as of `moment`."""
    matrix = confidence_matrix(history, weights, choices.half_life_days)
    if als_model is None:
        iterations = settings.als.refit_iterations if warm_start is not None else None
        als_model = fit_als(matrix, choices.als, warm_start=warm_start, iterations=iterations)
    if item_item is None and choices.item_item is not None:
        item_item = _item_item(choices, matrix, settings)
    ref = np.full(history.n_users, moment, dtype=np.float64)
    sizes = choices.candidates or _params_sizes(settings)
    bundle = ModelBundle(
        user_ids=history.user_ids,
        item_ids=history.item_ids,
        actions=history.actions,
        action_weights=weights,
        half_life_days=choices.half_life_days,
        als_params=choices.als,
        user_factors=als_model.user_factors,
        item_factors=als_model.item_factors,
        history=matrix,
        context=build_context(history, ref, als_model.item_factors, settings.ranker),
        ranker=None if ranker is None else ranker.booster,
        n_candidates=sizes[0],
        n_popular=sizes[1],
        kind=choices.kind,
        popularity=popularity_as_of(history, weights, moment, choices.popularity_window_days),
        item_item=item_item,
        n_item_item=sizes[2] if item_item is not None else 0,
        events=history,
    )
    bundle.info.update(
        ease_lambda=choices.ease_lambda,
        knn_weighting=choices.knn_weighting,
        popularity_window_days=choices.popularity_window_days,
    )
    return bundle, als_model


def _item_item(choices: Choices, matrix: sp.csr_matrix, settings: Settings) -> sp.csr_matrix | np.ndarray:
    if choices.item_item == KIND_EASE:
        return ease_weights(matrix, choices.ease_lambda)
    return knn_similarity(matrix, settings.selection.knn_neighbours, choices.knn_weighting)


def _ndcg(bundle: ModelBundle, truth: GroundTruth, kind: str) -> np.ndarray:
    return _scored(bundle, truth, kind)[0]


def _scored(bundle: ModelBundle, truth: GroundTruth, kind: str) -> tuple[np.ndarray, float]:
    """NDCG@10 per user, and coverage@10: the share of the catalogue shown to these users in their top 10."""
    recs, _ = bundle.recommend(truth.users, K, kind=kind)
    shown = np.unique(recs[recs != PAD])
    return ndcg_per_user(recs, truth.relevant, K), len(shown) / max(len(bundle.item_ids), 1)


def select(
    history: Interactions, profile: DataProfile, settings: Settings, weights: np.ndarray, progress: Progress | None
) -> tuple[Choices, RankerFit | None, SelectionReport]:
    """Choose the decay, ALS parameters, popularity window, item-item model, ranker and the served kind."""
    conf = settings.selection
    say = progress or (lambda _name: None)
    folds, warnings, sampled = make_folds(history, profile, settings)
    trials: dict[str, list[dict[str, Any]]] = {}
    start = ALSParams.from_settings(settings.als)
    enabled: set[str] = set(conf.models)

    def tune_truths() -> list[GroundTruth]:
        return [f.part(f.tune_rows) for f in folds]

    # 1. decay, judged by ALS with the starting parameters on the tuning users
    decay_fits: dict[float, list[AlternatingLeastSquares]] = {}  # the chosen decay's fits start the ALS search
    if settings.features.half_life_days is not None:
        half_life = float(settings.features.half_life_days)
    else:
        say("choose decay")
        scores = {}
        for candidate in conf.half_lives_days:
            values, als_fits = [], []
            for fold, truth in zip(folds, tune_truths(), strict=True):
                matrix = confidence_matrix(fold.window.history, weights, candidate)
                bundle, model = fit_bundle(fold.window.history, _moment(fold), _plain(KIND_ALS, candidate, start),
                                           settings, weights, als_model=fit_als(matrix, start))  # fmt: skip
                values.append(_ndcg(bundle, truth, KIND_ALS))
                als_fits.append(model)
            scores[candidate] = _pooled(values, folds)
            decay_fits[candidate] = als_fits
        half_life = max(scores, key=lambda c: (scores[c], -c))
        trials["half_life_days"] = [{"half_life_days": c, "ndcg@10": round(v, 5)} for c, v in scores.items()]

    # 2. ALS parameters (coordinate search, trials counted)
    say("tune ALS")
    matrices = [confidence_matrix(f.window.history, weights, half_life) for f in folds]
    known = {start: decay_fits[half_life]} if half_life in decay_fits else None
    # a trial replaces the best parameters so far only when ahead by more than the standard error of the paired
    # difference (the rule that chooses the served kind): the best of a dozen noisy trials is otherwise often
    # a near-tie won by chance
    tuned = tune_als(list(zip(matrices, tune_truths(), strict=True)), settings.als, k=K, fitted=known,
                     combine=lambda values: _pooled(values, folds),
                     clearly_better=lambda trial, best: _clearly_ahead(trial, best, folds))  # fmt: skip
    trials["als"] = tuned.trials
    choices = _plain(KIND_ALS, half_life, tuned.params)

    # 3. popularity window, EASE regularisation, item-item model: fold bundles share their ALS fits
    say("choose popularity, item-item")
    bundles = [
        fit_bundle(f.window.history, _moment(f), choices, settings, weights, als_model=m)[0]
        for f, m in zip(folds, tuned.models, strict=True)
    ]
    pop_scores = {}
    for days in conf.popularity_windows_days:
        values = []
        for fold, bundle, truth in zip(folds, bundles, tune_truths(), strict=True):
            bundle.set_popularity(popularity_as_of(fold.window.history, weights, _moment(fold), days))
            values.append(_ndcg(bundle, truth, KIND_POPULARITY))
        pop_scores[days] = _pooled(values, folds)
    pop_days = max(pop_scores, key=lambda d: (pop_scores[d], -d))
    trials["popularity_window_days"] = [{"days": d, "ndcg@10": round(v, 5)} for d, v in pop_scores.items()]
    for fold, bundle in zip(folds, bundles, strict=True):
        bundle.set_popularity(popularity_as_of(fold.window.history, weights, _moment(fold), pop_days))
    choices = replace(choices, popularity_window_days=pop_days)

    item_item_fits: dict[str, list[sp.csr_matrix | np.ndarray]] = {}
    item_item_scores: dict[str, float] = {}
    ease_lambda = conf.ease_lambdas[0] if conf.ease_lambdas else 0.0
    knn_weighting = conf.knn_weightings[0]
    if KIND_ITEM_KNN in enabled or KIND_TWO_STAGE in enabled:
        weighting_trials = []
        for weighting in conf.knn_weightings:
            fits = [knn_similarity(m, conf.knn_neighbours, weighting) for m in matrices]
            value = _item_item_score(bundles, fits, tune_truths(), KIND_ITEM_KNN, folds)
            weighting_trials.append({"weighting": weighting, "ndcg@10": round(value, 5)})
            if KIND_ITEM_KNN not in item_item_scores or value > item_item_scores[KIND_ITEM_KNN]:
                item_item_fits[KIND_ITEM_KNN], item_item_scores[KIND_ITEM_KNN] = fits, value
                knn_weighting = weighting
        trials["knn_weighting"] = weighting_trials
    ease_gb = (len(folds) + 1) * ease_bytes(history.n_items) / 1e9  # one matrix per fold + one being made
    if KIND_EASE in enabled and ease_gb <= conf.ease_max_gb and conf.ease_lambdas:
        lambda_scores = {}
        for lam in conf.ease_lambdas:  # made fold by fold as scored (one per fold + one being made); the chosen
            # lambda's are made again below rather than kept beside the trials'
            made = (ease_weights(m, lam) for m in matrices)
            lambda_scores[lam] = _item_item_score(bundles, made, tune_truths(), KIND_EASE, folds)
        ease_lambda = max(lambda_scores, key=lambda lam: lambda_scores[lam])
        trials["ease_lambda"] = [{"lambda": lam, "ndcg@10": round(v, 5)} for lam, v in lambda_scores.items()]
        for bundle in bundles:  # the last trial's matrices go before the chosen ones are made
            bundle.item_item = None
        item_item_fits[KIND_EASE] = [ease_weights(m, ease_lambda) for m in matrices]
        item_item_scores[KIND_EASE] = lambda_scores[ease_lambda]
    elif KIND_EASE in enabled:
        warnings.append(
            f"EASE skipped: {history.n_items:,} items need {ease_gb:.3g} GB for {len(folds) + 1} item x item matrices "
            f"> selection.ease_max_gb={conf.ease_max_gb:g}"
        )
    item_item = max(item_item_scores, key=lambda name: item_item_scores[name]) if item_item_scores else None
    choices = replace(choices, item_item=item_item, ease_lambda=ease_lambda, knn_weighting=knn_weighting)

    # 4. the ranker, trained on the tuning users' candidates of every fold (item-item candidates included)
    ranker_fit: RankerFit | None = None
    ranker_info: dict[str, Any] | None = None
    ranker_rows: dict[int, RankerRows] = {}  # each fold's tuning users' rows, reused by the refit
    if KIND_TWO_STAGE in enabled and settings.ranker.enabled:
        say("train ranker")
        for index, bundle in enumerate(bundles):
            if item_item is not None:
                bundle.item_item = item_item_fits[item_item][index]
                bundle.n_item_item = settings.candidates.item_item
        ranker_fit, ranker_info, leaves_trials = _choose_ranker(folds, bundles, settings, weights, ranker_rows)
        if leaves_trials:
            trials["ranker_num_leaves"] = leaves_trials
        if ranker_fit is not None:
            say("choose candidate sizes")
            served_sizes, trials["candidate_sizes"] = _choose_sizes(folds, bundles, ranker_fit, settings)
            choices = replace(choices, candidates=served_sizes)

    # 5. the served kind, chosen on the selecting users
    say("select model")
    if KIND_TWO_STAGE in enabled and ranker_fit is None and KIND_ALS not in enabled:
        enabled.add(KIND_ALS)  # no ranker (ranker.enabled false, or nothing to learn): its candidates serve
        warnings.append("no ranker could be used, so ALS (the ranker's candidate stage) may serve instead")
    per_kind: dict[str, list[np.ndarray]] = {}
    coverage: dict[str, list[float]] = {}
    for index, (fold, bundle) in enumerate(zip(folds, bundles, strict=True)):
        truth = fold.part(fold.select_rows)
        for kind in SIMPLICITY:
            if kind not in enabled:
                continue
            if kind in ITEM_ITEM_KINDS:
                if kind not in item_item_fits:
                    continue
                bundle.item_item = item_item_fits[kind][index]
            elif kind == KIND_TWO_STAGE:
                if bundle.ranker is None:
                    continue
                bundle.item_item = None if item_item is None else item_item_fits[item_item][index]
            ndcg, covered = _scored(bundle, truth, kind)
            per_kind.setdefault(kind, []).append(ndcg)
            coverage.setdefault(kind, []).append(covered)
    models: dict[str, dict[str, Any]] = {}
    for kind, values in per_kind.items():
        sizes = [len(v) for v in values]
        models[kind] = {
            "ndcg@10": round(_pooled(values, folds), 5),
            # the interval of the reported statistic, users resampled within folds
            "ci95": grouped_bootstrap_interval(
                values, partial(_protocol_mean, sizes=sizes, folds=folds), conf.bootstrap, conf.seed
            ),
            "coverage@10": round(_protocol_mean(coverage[kind], sizes, folds), 4),
            "users": sum(len(v) for v in values),
            "per_fold": [round(float(v.mean()), 5) for v in values],
        }
    ranked = sorted(models, key=lambda kind: (-models[kind]["ndcg@10"], SIMPLICITY.index(kind)))
    leader = ranked[0]
    for kind in models:  # how far each kind is behind the best, in standard errors of the paired difference
        gap, se = _paired_gap(per_kind[leader], per_kind[kind], folds)
        models[kind].update(gap_to_best=round(gap, 5), gap_se=round(se, 5))
    # the one-standard-error rule: the simplest kind whose shortfall is within one standard error of the best, so a
    # more complex model serves only when validation can tell it apart from the simpler one
    served = next(
        kind for kind in SIMPLICITY if kind in models and models[kind]["gap_to_best"] <= models[kind]["gap_se"]
    )
    if served == leader:
        decided = f"{served}: highest validation NDCG@10 ({models[served]['ndcg@10']:.4f})"
        if len(ranked) > 1:
            runner = ranked[1]
            decided += f", next {runner} {models[runner]['ndcg@10']:.4f} (behind by {models[runner]['gap_to_best']:.4f}"
            decided += f", standard error {models[runner]['gap_se']:.4f})"
    else:
        decided = (
            f"{served}: the simplest model within one standard error of the best ({leader} "
            f"{models[leader]['ndcg@10']:.4f}; {served} {models[served]['ndcg@10']:.4f}, behind by "
            f"{models[served]['gap_to_best']:.4f}, standard error {models[served]['gap_se']:.4f})"
        )
    if KIND_TWO_STAGE in enabled and served != KIND_TWO_STAGE and KIND_TWO_STAGE in models:
        decided += "; the ranker did not beat its candidates and is switched off"
    if served == KIND_POPULARITY:
        decided += "; no personalised model beat popularity, so popularity serves"
    choices = replace(choices, kind=served)
    if served != KIND_TWO_STAGE:
        ranker_fit = None
    elif ranker_fit is not None and ranker_info is not None:
        # chosen: the served ranker learns from every user of the folds, tune, select and spare (a refit after the
        # choice, as ALS is refitted on all the data), with the chosen leaves; its own early stopping keeps the
        # iterations honest
        say("refit ranker")
        for index, bundle in enumerate(bundles):  # the ranker learns on params.yaml's sizes, as it was trained
            bundle.item_item = None if item_item is None else item_item_fits[item_item][index]
            bundle.n_candidates, bundle.n_popular, bundle.n_item_item = _params_sizes(settings)
        refit, refit_info = _train_ranker(
            folds, bundles, settings, weights, ranker_rows, everyone=True, num_leaves=ranker_fit.num_leaves
        )
        if refit is not None:
            ranker_fit = refit
            ranker_info["refit_on_all_fold_users"] = {
                k: refit_info[k] for k in ("rows", "best_iteration", "train_queries", "validation_queries")
            }
    if served in ITEM_ITEM_KINDS:
        choices = replace(choices, item_item=served)
    elif served != KIND_TWO_STAGE:
        choices = replace(choices, item_item=None)  # nothing served needs it
    report = SelectionReport(
        choices=asdict(choices),
        folds=[
            {
                "protocol": f.protocol,
                "events": len(f.window.history),
                "tune_users": len(f.tune_rows),
                "select_users": len(f.select_rows),
                "ranker_only_users": len(f.spare_rows),
            }
            for f in folds
        ],
        models=models,
        decided=decided,
        warnings=warnings,
        trials=trials,
        ranker=ranker_info,
        als_start=_widened(tuned.models[0], sampled, history.n_users),
        sampled=sampled is not None,
        full=all(
            sum(f.judged for f in folds if f.protocol == protocol) >= conf.max_users for protocol in profile.protocols
        ),
    )
    return choices, ranker_fit, report


def _params_sizes(settings: Settings) -> tuple[int, int, int]:
    return settings.candidates.n, settings.candidates.popular, settings.candidates.item_item


def _choose_sizes(
    folds: list[Fold], bundles: list[ModelBundle], ranker: RankerFit, settings: Settings
) -> tuple[tuple[int, int, int], list[dict[str, Any]]]:
    """The candidate sizes served by the two-stage model: params.yaml's, each source's scaled by
    `selection.candidate_scales` in turn (ALS, popular, item-item), judged by `_ranker_judges`; a size replaces
    the one so far only when clearly ahead (`_clearly_ahead`). Leaves the bundles with the chosen sizes."""
    judged, truths = _ranker_judges(folds, ranker)
    chosen = _params_sizes(settings)
    if not judged:
        return chosen, []
    scored = [b for b, f in zip(bundles, folds, strict=True) if f in judged]
    has_item_item = bundles[0].item_item is not None

    def score(sizes: tuple[int, int, int]) -> list[np.ndarray]:
        for bundle in scored:
            bundle.n_candidates, bundle.n_popular = sizes[0], sizes[1]
            bundle.n_item_item = sizes[2] if has_item_item else 0
        return [_ndcg(b, t, KIND_TWO_STAGE) for b, t in zip(scored, truths, strict=True)]

    best = score(chosen)
    users = sum(len(t.users) for t in truths)
    log = [{"sizes": list(chosen), "ndcg@10": round(_pooled(best, judged), 5), "users": users}]
    base = chosen
    for source in range(3 if has_item_item else 2):
        for scale in settings.selection.candidate_scales if base[source] else ():
            scaled = list(chosen)
            scaled[source] = max(1, round(base[source] * scale))
            trial = (scaled[0], scaled[1], scaled[2])
            if trial == chosen:
                continue
            values = score(trial)
            log.append({"sizes": list(trial), "ndcg@10": round(_pooled(values, judged), 5), "users": users})
            if _clearly_ahead(values, best, judged):
                chosen, best = trial, values
    for bundle in bundles:
        bundle.n_candidates, bundle.n_popular = chosen[0], chosen[1]
        bundle.n_item_item = chosen[2] if has_item_item else 0
    return chosen, log


def _ranker_judges(folds: list[Fold], ranker: RankerFit) -> tuple[list[Fold], list[GroundTruth]]:
    """The folds (with at least two) and users that judge a ranker's settings: the users the ranker learns from
    (tuning users, and those past `selection.max_users`) that its trees were not grown on (its early-stopping
    users, and those past `ranker.max_train_users` or without a relevant candidate)."""
    fitted = set(ranker.fitted.tolist())
    judged, truths, offset = [], [], 0
    for fold in folds:  # queries are numbered as `_train_ranker` numbers them: fold offset + window user
        learners = np.concatenate([fold.tune_rows, fold.spare_rows])
        rows = learners[[offset + int(u) not in fitted for u in fold.truth.users[learners]]]
        offset += fold.window.history.n_users
        if len(rows) >= 2:
            judged.append(fold)
            truths.append(fold.part(rows))
    return judged, truths


def _choose_ranker(
    folds: list[Fold], bundles: list[ModelBundle], settings: Settings, weights: np.ndarray, built: dict[int, RankerRows]
) -> tuple[RankerFit | None, dict[str, Any], list[dict[str, Any]]]:
    """The ranker trained (`_train_ranker`) with each of `ranker.num_leaves` on the same queries, judged as the
    candidate sizes are (`_ranker_judges`: the same users for each, since the early-stopping queries depend on the
    seed and the queries only): the highest NDCG@10 wins, a tie goes to the first. Leaves the chosen ranker in
    the bundles. Returns it (None when there is nothing to learn), its report and the trials."""
    trials: list[dict[str, Any]] = []
    best: tuple[float, RankerFit, dict[str, Any]] | None = None
    judged: list[Fold] = []
    truths: list[GroundTruth] = []
    for leaves in settings.ranker.num_leaves:
        fit, info = _train_ranker(folds, bundles, settings, weights, built, num_leaves=leaves)
        if fit is None:
            return None, info, trials  # no query has a relevant candidate: no tree size changes that
        for bundle in bundles:
            bundle.ranker = fit.booster
        if best is None:
            judged, truths = _ranker_judges(folds, fit)
            if len(settings.ranker.num_leaves) == 1 or not judged:
                return fit, info, trials
        scored = [b for b, f in zip(bundles, folds, strict=True) if f in judged]
        value = _pooled([_ndcg(b, t, KIND_TWO_STAGE) for b, t in zip(scored, truths, strict=True)], judged)
        users = sum(len(t.users) for t in truths)
        trials.append({"num_leaves": leaves, "ndcg@10": round(value, 5), "best_iteration": fit.best_iteration,
                       "users": users})  # fmt: skip
        if best is None or value > best[0]:
            best = (value, fit, info)
    assert best is not None
    for bundle in bundles:
        bundle.ranker = best[1].booster
    return best[1], best[2], trials


def _widened(model: AlternatingLeastSquares, sampled: np.ndarray | None, n_users: int) -> AlternatingLeastSquares:
    """A fold's ALS fit as wide as the data's users, to warm-start fits on all of it: a sampled user's factors at
    the user's own index, zeros elsewhere (what a fit on the sample's events gives a user without any)."""
    if sampled is None:
        return model
    wide = AlternatingLeastSquares(factors=model.factors, regularization=model.regularization, alpha=model.alpha,
                                   iterations=model.iterations, random_state=model.random_state)  # fmt: skip
    wide.user_factors = np.zeros((n_users, model.user_factors.shape[1]), dtype=model.user_factors.dtype)
    wide.user_factors[sampled] = model.user_factors
    wide.item_factors = model.item_factors
    return wide


def _protocol_mean(means: Sequence[float], sizes: Sequence[int], folds: list[Fold]) -> float:
    """The mean over protocols of each protocol's mean over its judged users, from each fold's mean and number of
    users: every protocol counts the same, and within one every user does (a late global cut judging a few users
    counts as a few users, not as a fold)."""
    totals: dict[str, list[float]] = {}
    for mean, size, fold in zip(means, sizes, folds, strict=True):
        total = totals.setdefault(fold.protocol, [0.0, 0.0])
        total[0] += float(mean) * size
        total[1] += size
    return float(np.mean([weighted / users for weighted, users in totals.values()]))


def _pooled(values: Sequence[np.ndarray], folds: list[Fold]) -> float:
    """`_protocol_mean` of per-user values, one array per fold."""
    return _protocol_mean([v.mean() for v in values], [len(v) for v in values], folds)


def _clearly_ahead(first: list[np.ndarray], second: list[np.ndarray], folds: list[Fold]) -> bool:
    """`first` is ahead of `second` by more than the standard error of their paired difference."""
    gap, se = _paired_gap(first, second, folds)
    return gap > se


def _paired_gap(best: list[np.ndarray], other: list[np.ndarray], folds: list[Fold]) -> tuple[float, float]:
    """How far `other` is behind `best` (`_pooled` per-user differences: over each protocol's users, then over
    protocols) and the standard error of that difference (the same users judge both, so the difference is paired)."""
    gap = _pooled([b - o for b, o in zip(best, other, strict=True)], folds)
    protocols = sorted({f.protocol for f in folds})
    variance = 0.0
    for protocol in protocols:
        mine = [(b, o) for b, o, f in zip(best, other, folds, strict=True) if f.protocol == protocol]
        users = sum(len(b) for b, _ in mine)
        # within a protocol a fold weighs its share of the users; the protocols weigh 1/len(protocols)
        for b, o in mine:
            variance += (paired_standard_error(b, o) * len(b) / (users * len(protocols))) ** 2
    return gap, float(np.sqrt(variance))


def _moment(fold: Fold) -> float:
    return float(fold.window.ref_time.max())


def _plain(kind: str, half_life: float, als: ALSParams) -> Choices:
    return Choices(kind=kind, half_life_days=half_life, als=als, popularity_window_days=0.0, item_item=None,
                   ease_lambda=0.0)  # fmt: skip


def _item_item_score(
    bundles: list[ModelBundle],
    fits: Iterable[sp.csr_matrix | np.ndarray],
    truths: list[GroundTruth],
    kind: str,
    folds: list[Fold],
) -> float:
    values = []
    for bundle, fit, truth in zip(bundles, fits, truths, strict=True):
        bundle.item_item = fit
        values.append(_ndcg(bundle, truth, kind))
    return _pooled(values, folds)


class RankerRows(NamedTuple):
    """A fold's ranker rows for some of its judged users."""

    rows: np.ndarray  # the users' rows of the fold's truth
    X: np.ndarray
    labels: np.ndarray
    row_user: np.ndarray
    recall_sum: float  # the candidates' recall summed over the users


def _ranker_rows(fold: Fold, bundle: ModelBundle, rows: np.ndarray, grades: np.ndarray) -> RankerRows:
    """The ranker's rows for judged users `rows` of a fold: their candidates' features and graded labels."""
    users = fold.truth.users[rows]
    candidates = bundle.candidate_set(users)
    width = candidates.items.shape[1]
    recall = recall_curve(candidates.items, fold.truth.relevant[rows], (width,))[width] * len(rows)
    X, row_user, row_item = candidate_features(bundle.context, users, candidates)
    return RankerRows(rows, X, grade_labels(fold.window.target, row_user, row_item, grades), row_user, recall)


def _train_ranker(
    folds: list[Fold],
    bundles: list[ModelBundle],
    settings: Settings,
    weights: np.ndarray,
    built: dict[int, RankerRows],
    *,
    everyone: bool = False,
    num_leaves: int | None = None,
) -> tuple[RankerFit | None, dict[str, Any]]:
    """LambdaRank on the two-stage candidates of the tuning users and the users past `selection.max_users`
    (`everyone`: the selecting users too), features as of each fold's moment. `built` keeps each fold's rows once
    made (a refit on everyone builds only the others')."""
    grades = action_grades(weights)
    parts = []
    recall = []
    offset = 0
    for index, (fold, bundle) in enumerate(zip(folds, bundles, strict=True)):
        learners = [fold.tune_rows, fold.spare_rows, fold.select_rows if everyone else fold.select_rows[:0]]
        wanted = np.concatenate(learners)[: settings.ranker.max_train_users]
        pieces = []
        if index in built and np.isin(built[index].rows, wanted).all():
            pieces.append(built[index])
            wanted = np.setdiff1d(wanted, built[index].rows)
        if len(wanted) or not pieces:
            pieces.append(_ranker_rows(fold, bundle, wanted, grades))
        built.setdefault(index, pieces[-1])
        recall.append(sum(p.recall_sum for p in pieces) / max(sum(len(p.rows) for p in pieces), 1))
        X = np.concatenate([p.X for p in pieces])
        labels = np.concatenate([p.labels for p in pieces])
        row_user = np.concatenate([p.row_user for p in pieces])
        parts.append((X, labels, offset + row_user, np.full(len(X), fold.protocol, dtype=object)))
        offset += fold.window.history.n_users
    X, labels, query, protocol = (np.concatenate(column) for column in zip(*parts, strict=True))
    # every protocol weighs the same in the ranker's loss, however many users its folds judge (LightGBM's
    # lambdarank weighs a query by the sum of its rows' weights)
    starts = np.flatnonzero(np.r_[True, query[1:] != query[:-1]])
    sizes = np.diff(np.r_[starts, len(query)])
    query_protocol = protocol[starts]
    names_, per_protocol = np.unique(query_protocol, return_counts=True)
    share = dict(zip(names_, len(starts) / (len(names_) * per_protocol), strict=True))
    row_weights = np.repeat(np.array([share[p] for p in query_protocol]) / sizes, sizes)
    names = feature_names(bundles[0].actions, settings.ranker.popularity_windows_days)
    info: dict[str, Any] = {"candidate_recall": [round(r, 4) for r in recall], "rows": len(X)}
    try:
        fit = train_ranker(
            X, labels, query, names, settings.ranker, seed=settings.als.random_state, weights=row_weights,
            num_leaves=num_leaves,
        )  # fmt: skip
    except ValueError as exc:
        info["skipped"] = str(exc)
        return None, info
    info.update(
        num_leaves=fit.num_leaves,
        best_iteration=fit.best_iteration,
        validation_ndcg=fit.validation_ndcg,
        train_queries=fit.train_queries,
        validation_queries=fit.validation_queries,
        feature_importance=fit.importances,
    )
    return fit, info
