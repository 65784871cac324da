"""A trained two-stage model as one directory: ALS factors with id maps, ranker, history, popularity.

The same bundle serves the offline evaluation (the backtest bundle, trained without the test window), the
batch `recflow recommend` and, later, the HTTP service (the bundle trained on everything).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares

from recflow.constants import ITEM_ID, USER_ID
from recflow.errors import ModelNotFoundError
from recflow.files import atomic_dir, atomic_path
from recflow.model.candidates import ALSParams, CandidateSet
from recflow.model.features import Interactions
from recflow.model.metrics import PAD
from recflow.model.ranker import rerank
from recflow.model.ranker_features import FeatureContext, feature_names
from recflow.model.scoring import (
    KIND_ALS,
    KIND_POPULARITY,
    KIND_TWO_STAGE,
    candidates_of,
    popular_order,
    score_users,
)

logger = logging.getLogger(__name__)

BUNDLE_FILE = "bundle.json"


@dataclass
class ModelBundle:
    """One trained model version. `kind` is what it serves (chosen on validation, see selection.py); the
    ALS factors, popularity and, when fitted, the item-item weights are kept whatever the kind: the service
    folds new events into ALS vectors, `/similar` uses the item factors, and evaluation scores the baselines
    of the same fit."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    actions: tuple[str, ...]
    action_weights: np.ndarray
    half_life_days: float  # decay from each user's last event (0: none)
    als_params: ALSParams
    user_factors: np.ndarray
    item_factors: np.ndarray
    history: sp.csr_matrix  # users x items confidence the model was trained on, as of `moment`
    context: FeatureContext  # the ranker's features as of `moment`
    ranker: lgb.Booster | None
    n_candidates: int
    n_popular: int  # popular candidates merged with the ALS ones (candidates.popular when trained)
    kind: str = KIND_TWO_STAGE
    popularity: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    item_item: sp.csr_matrix | np.ndarray | None = None
    n_item_item: int = 0
    events: Interactions | None = None  # the encoded history (for answers as of an earlier moment)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.popularity) == 0:  # no window chosen: all-time confidence
            self.popularity = np.asarray(self.history.sum(axis=0)).ravel().astype(np.float32)
        if self.kind == KIND_TWO_STAGE and self.ranker is None:
            self.kind = KIND_ALS

    @property
    def moment(self) -> float:
        """The time the bundle's history and features are as of (the end of its training data)."""
        return float(self.context.ref_time.max()) if len(self.context.ref_time) else 0.0

    @cached_property
    def popular_order(self) -> np.ndarray:
        return popular_order(self.popularity)

    def set_popularity(self, popularity: np.ndarray) -> None:
        """Replace the popularity (a window chosen on validation) and the order cached from it."""
        self.popularity = popularity
        self.__dict__.pop("popular_order", None)

    @cached_property
    def solver(self) -> AlternatingLeastSquares:
        """ALS with the bundle's item factors, to solve user vectors from confidence rows (fold-in)."""
        params = self.als_params
        solver = AlternatingLeastSquares(
            factors=params.factors, regularization=params.regularization, alpha=params.alpha, num_threads=1
        )
        solver.item_factors = self.item_factors
        solver.YtY  # noqa: B018 - computed once here, not on the first solve
        return solver

    def solve(self, rows: sp.csr_matrix) -> np.ndarray:
        """Exact ALS user vectors for confidence rows against the fixed item factors (Cholesky solve)."""
        if rows.shape[0] == 0:
            return np.zeros((0, self.item_factors.shape[1]), dtype=np.float32)
        return np.atleast_2d(self.solver.recalculate_user(np.arange(rows.shape[0]), rows.astype(np.float32)))

    @cached_property
    def user_index(self) -> dict[str, int]:
        return {user: i for i, user in enumerate(self.user_ids)}

    def rerank_fn(
        self, users: np.ndarray, context: FeatureContext | None = None, num_threads: int = 0
    ) -> Callable[[np.ndarray, CandidateSet, int], tuple[np.ndarray, np.ndarray]]:
        """The ranker applied to candidates of `users[positions]` (indices into `context`)."""
        ctx = self.context if context is None else context
        ranker = self.ranker

        def apply(positions: np.ndarray, candidates: CandidateSet, k: int) -> tuple[np.ndarray, np.ndarray]:
            assert ranker is not None
            return rerank(ranker, ctx, users[positions], candidates, k, num_threads=num_threads)

        return apply

    def recommend(self, users: np.ndarray, k: int, *, kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k for known user indices as of the bundle's moment, by the bundle's kind (or `kind`)."""
        users = np.asarray(users, dtype=np.int64)
        return score_users(
            self,
            self.history[users],
            k,
            vectors=self.user_factors[users],
            rerank_fn=self.rerank_fn(users) if self.ranker is not None else None,
            kind=kind,
        )

    def candidate_set(self, users: np.ndarray) -> CandidateSet:
        """The two-stage candidates of known users (what the ranker scores)."""
        users = np.asarray(users, dtype=np.int64)
        return candidates_of(self, self.history[users], self.user_factors[users])

    def recommend_ids(self, user_ids: list[str], k: int) -> list[dict[str, Any]]:
        """Recommendations by external id: known users get the model, unknown users the popular items."""
        known_arr = np.asarray([self.user_index.get(u, -1) for u in user_ids], dtype=np.int64)
        rows = np.flatnonzero(known_arr >= 0)
        personal_items, personal_scores = self.recommend(known_arr[rows], k)
        top_popular = self.popular_order[:k]
        out: list[dict[str, Any]] = []
        by_row = {int(r): j for j, r in enumerate(rows)}
        for position, user in enumerate(user_ids):
            if position in by_row:
                j = by_row[position]
                chosen, chosen_scores = personal_items[j], personal_scores[j]
                strategy = "personalized" if self.kind != KIND_POPULARITY else "popular"
            else:
                chosen, chosen_scores = top_popular, self.popularity[top_popular]
                strategy = "popular"
            keep = chosen != PAD
            out.append(
                {
                    "user_id": user,
                    "items": [str(i) for i in self.item_ids[chosen[keep]]],
                    "scores": [round(float(s), 6) for s in chosen_scores[keep]],
                    "strategy": strategy,
                }
            )
        return out

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / "als.npz") as tmp, tmp.open("wb") as fh:
            np.savez(fh, user_factors=self.user_factors, item_factors=self.item_factors)
        with atomic_path(path / "history.npz") as tmp, tmp.open("wb") as fh:
            sp.save_npz(fh, self.history, compressed=False)  # zlib took 20 s at 10M events
        with atomic_path(path / "context.npz") as tmp, tmp.open("wb") as fh:
            self.context.save(fh)
        with atomic_path(path / "users.parquet") as tmp:
            pq.write_table(pa.table({USER_ID: pa.array(self.user_ids, pa.string())}), tmp)
        with atomic_path(path / "items.parquet") as tmp:
            pq.write_table(pa.table({ITEM_ID: pa.array(self.item_ids, pa.string())}), tmp)
        ranker_file = path / "ranker.txt"
        if self.ranker is not None:
            with atomic_path(ranker_file) as tmp:
                self.ranker.save_model(tmp, num_iteration=self.ranker.best_iteration or None)
        else:
            ranker_file.unlink(missing_ok=True)
        with atomic_path(path / "popularity.npy") as tmp, tmp.open("wb") as fh:
            np.save(fh, self.popularity)
        item_item_file = path / "item_item.npz"
        if self.item_item is not None:
            with atomic_path(item_item_file) as tmp, tmp.open("wb") as fh:
                if sp.issparse(self.item_item):
                    sp.save_npz(fh, sp.csr_matrix(self.item_item), compressed=False)
                else:
                    np.savez(fh, dense=self.item_item)
        else:
            item_item_file.unlink(missing_ok=True)
        if self.events is not None:
            with atomic_path(path / "events.parquet") as tmp:
                pq.write_table(
                    pa.table({"user_idx": self.events.user_idx, "item_idx": self.events.item_idx,
                              "action_idx": self.events.action_idx, "ts": self.events.ts}),
                    tmp,
                )  # fmt: skip
        meta = {
            "kind": self.kind,
            "n_item_item": self.n_item_item,
            "actions": list(self.actions),
            "action_weights": self.action_weights.tolist(),
            "half_life_days": self.half_life_days,
            "als_params": asdict(self.als_params),
            "n_candidates": self.n_candidates,
            "n_popular": self.n_popular,
            "has_ranker": self.ranker is not None,
            "info": self.info,
        }
        with atomic_path(path / BUNDLE_FILE) as tmp:  # written last: its presence marks a complete bundle
            tmp.write_text(json.dumps(meta, indent=2))

    @staticmethod
    def read_meta(path: Path) -> dict[str, Any]:
        """The saved bundle's description (kind, actions, info with the training id...) without its arrays."""
        if not (path / BUNDLE_FILE).exists():
            raise ModelNotFoundError(f"no trained model in {path}: run `recflow train` (or dvc repro) first")
        meta: dict[str, Any] = json.loads((path / BUNDLE_FILE).read_text())
        return meta

    @classmethod
    def load(cls, path: Path) -> ModelBundle:
        meta = cls.read_meta(path)
        with np.load(path / "als.npz") as als:
            user_factors, item_factors = als["user_factors"], als["item_factors"]
        context = FeatureContext.load(path / "context.npz")
        ranker = lgb.Booster(model_file=str(path / "ranker.txt")) if meta["has_ranker"] else None
        if ranker is not None and ranker.feature_name() != feature_names(tuple(meta["actions"]), context.windows_days):
            raise ModelNotFoundError(
                f"the model in {path} has a ranker trained on other features than this recflow computes (it was "
                "trained by an earlier version): run `recflow train` (or dvc repro) to train it again"
            )
        item_item: sp.csr_matrix | np.ndarray | None = None
        if (path / "item_item.npz").exists():
            with np.load(path / "item_item.npz", allow_pickle=False) as data:
                item_item = data["dense"] if "dense" in data.files else None
            if item_item is None:
                item_item = sp.load_npz(path / "item_item.npz").tocsr()
        user_ids = np.asarray(pq.read_table(path / "users.parquet")[USER_ID].to_pylist(), dtype=object)
        item_ids = np.asarray(pq.read_table(path / "items.parquet")[ITEM_ID].to_pylist(), dtype=object)
        events = None
        if (path / "events.parquet").exists():
            table = pq.read_table(path / "events.parquet")
            events = Interactions(
                user_idx=table["user_idx"].to_numpy(),
                item_idx=table["item_idx"].to_numpy(),
                action_idx=table["action_idx"].to_numpy(),
                ts=table["ts"].to_numpy(),
                split=np.zeros(table.num_rows, dtype=np.int8),
                user_ids=user_ids,
                item_ids=item_ids,
                actions=tuple(meta["actions"]),
            )
        return cls(
            user_ids=user_ids,
            item_ids=item_ids,
            actions=tuple(meta["actions"]),
            action_weights=np.asarray(meta["action_weights"]),
            half_life_days=float(meta["half_life_days"]),
            als_params=ALSParams(**meta["als_params"]),
            user_factors=user_factors,
            item_factors=item_factors,
            history=sp.load_npz(path / "history.npz").tocsr(),
            context=context,
            ranker=ranker,
            n_candidates=int(meta["n_candidates"]),
            n_popular=int(meta.get("n_popular", 0)),
            kind=str(meta.get("kind", KIND_TWO_STAGE if meta["has_ranker"] else KIND_ALS)),
            popularity=np.load(path / "popularity.npy") if (path / "popularity.npy").exists() else np.zeros(0),
            item_item=item_item,
            n_item_item=int(meta.get("n_item_item", 0)),
            events=events,
            info=meta["info"],
        )


def save_bundle_atomically(bundle: ModelBundle, path: Path) -> None:
    """Save into a fresh hidden sibling folder, then swap it in with two renames: a crash while saving leaves
    the previous bundle whole (the crash-safety the train stage and the Prefect train flow rely on;
    tests/integration/test_flows)."""
    with atomic_dir(path) as staging:
        bundle.save(staging)
