"""A trained two-stage model as one directory: ALS factors with id maps, ranker, history, popularity.

The same bundle serves the offline evaluation (the backtest bundle, trained without the test window), the
batch `recflow recommend` and, later, the HTTP service (the bundle trained on everything).
"""

from __future__ import annotations

import json
import logging
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
from recflow.model.candidates import ALSParams, ImplicitCandidates, MergedCandidates, PopularityCandidates
from recflow.model.metrics import PAD
from recflow.model.ranker import rerank
from recflow.model.ranker_features import FeatureContext

logger = logging.getLogger(__name__)

BUNDLE_FILE = "bundle.json"
RERANK_BATCH = 16_384  # users reranked at once


@dataclass
class ModelBundle:
    user_ids: np.ndarray
    item_ids: np.ndarray
    actions: tuple[str, ...]
    action_weights: np.ndarray
    half_life_days: float
    als_params: ALSParams
    user_factors: np.ndarray
    item_factors: np.ndarray
    history: sp.csr_matrix  # users x items confidence the model was trained on
    context: FeatureContext
    ranker: lgb.Booster | None
    n_candidates: int
    n_popular: int  # popular candidates merged with the ALS ones (candidates.popular when trained)
    info: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def als(self) -> AlternatingLeastSquares:
        model = AlternatingLeastSquares(factors=self.als_params.factors, random_state=self.als_params.random_state)
        model.user_factors = self.user_factors
        model.item_factors = self.item_factors
        return model

    @cached_property
    def als_candidates(self) -> ImplicitCandidates:
        return ImplicitCandidates(self.als, self.history)

    @cached_property
    def popular(self) -> PopularityCandidates:
        return PopularityCandidates(self.history)

    @cached_property
    def candidates(self) -> MergedCandidates:
        return MergedCandidates(self.als_candidates, self.popular, self.n_popular)

    @cached_property
    def user_index(self) -> dict[str, int]:
        return {user: i for i, user in enumerate(self.user_ids)}

    def recommend(self, users: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Two-stage top-k for known user indices: ALS top-N plus popular candidates, reranked by the ranker;
        without a ranker, ALS alone."""
        n = max(self.n_candidates, k)
        if self.ranker is None:
            return self.als_candidates.recommend(users, k)
        users = np.asarray(users)
        items = np.full((len(users), k), PAD, dtype=np.int64)
        scores = np.full((len(users), k), -np.inf, dtype=np.float32)
        for start in range(0, len(users), RERANK_BATCH):  # bounds the memory of candidates and their features
            batch = slice(start, start + RERANK_BATCH)
            candidates = self.candidates.candidates(users[batch], n)
            items[batch], scores[batch] = rerank(self.ranker, self.context, users[batch], candidates, k)
        return items, scores

    def recommend_ids(self, user_ids: list[str], k: int) -> list[dict[str, Any]]:
        """Recommendations by external id: known users get the two-stage model, unknown users the popular items."""
        known_arr = np.asarray([self.user_index.get(u, -1) for u in user_ids], dtype=np.int64)
        rows = np.flatnonzero(known_arr >= 0)
        personal_items, personal_scores = self.recommend(known_arr[rows], k)
        top_popular = self.popular.order[:k]
        out: list[dict[str, Any]] = []
        by_row = {int(r): j for j, r in enumerate(rows)}
        for position, user in enumerate(user_ids):
            if position in by_row:
                j = by_row[position]
                chosen, chosen_scores = personal_items[j], personal_scores[j]
                strategy = "personalized"
            else:
                chosen, chosen_scores = top_popular, self.popular.scores[top_popular]
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
            sp.save_npz(fh, self.history)
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
        meta = {
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

    @classmethod
    def load(cls, path: Path) -> ModelBundle:
        if not (path / BUNDLE_FILE).exists():
            raise ModelNotFoundError(f"no trained model in {path}: run `recflow train` (or dvc repro) first")
        meta = json.loads((path / BUNDLE_FILE).read_text())
        with np.load(path / "als.npz") as als:
            user_factors, item_factors = als["user_factors"], als["item_factors"]
        ranker = lgb.Booster(model_file=str(path / "ranker.txt")) if meta["has_ranker"] else None
        return cls(
            user_ids=np.asarray(pq.read_table(path / "users.parquet")[USER_ID].to_pylist(), dtype=object),
            item_ids=np.asarray(pq.read_table(path / "items.parquet")[ITEM_ID].to_pylist(), dtype=object),
            actions=tuple(meta["actions"]),
            action_weights=np.asarray(meta["action_weights"]),
            half_life_days=float(meta["half_life_days"]),
            als_params=ALSParams(**meta["als_params"]),
            user_factors=user_factors,
            item_factors=item_factors,
            history=sp.load_npz(path / "history.npz").tocsr(),
            context=FeatureContext.load(path / "context.npz"),
            ranker=ranker,
            n_candidates=int(meta["n_candidates"]),
            n_popular=int(meta.get("n_popular", 0)),
            info=meta["info"],
        )


def save_bundle_atomically(bundle: ModelBundle, path: Path) -> None:
    """Save into a fresh hidden sibling folder, then swap it in with two renames: a crash while saving leaves
    the previous bundle whole (the crash-safety the train stage and the Prefect train flow rely on;
    tests/integration/test_flows)."""
    with atomic_dir(path) as staging:
        bundle.save(staging)
