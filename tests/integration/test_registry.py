"""The model registry through a real BentoML model store in a temporary folder: versions, the promotion gate,
the deployment history and rollback (no mocks)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from recflow.config import Settings, load_settings
from recflow.constants import TIMESTAMP
from recflow.errors import ModelNotFoundError, NoProductionError, RegistryError
from recflow.events.synth import generate_events
from recflow.model.bundle import ModelBundle
from recflow.model.evaluate import METRICS_FILE, evaluate
from recflow.model.features import build_features
from recflow.model.training import BACKTEST_DIR, BUNDLE_DIR, train
from recflow.ops import gate, registry
from recflow.ops.gate import score_on_current_window
from recflow.store.eventstore import ingest_table

from ..conftest import write_small_project
from ..servingkit import SERVING_PROJECT, train_small_project

BENTOML = str(Path(sys.executable).parent / "bentoml")
MOVED = ("store", "rejected", "features", "models", "reports")


def train_and_evaluate(settings: Settings) -> None:
    train(settings.paths.features, settings.paths.models, settings)
    evaluate(settings.paths.features, settings.paths.models, settings.paths.reports, settings)


def worse(settings: Settings) -> Settings:
    """A clearly worse model: no ranker and a one-factor ALS."""
    return settings.replace("ranker", enabled=False).replace("als", factors=1)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Settings]:
    root = tmp_path_factory.mktemp("registry")
    settings, _ = train_small_project(root)
    settings = settings.replace("paths", reports=root / "reports")
    evaluate(settings.paths.features, settings.paths.models, settings.paths.reports, settings)
    return root, settings


@pytest.fixture
def store(project: tuple[Path, Settings], tmp_path: Path) -> Settings:
    """The project's settings with a fresh, empty model store of this test's own."""
    _, settings = project
    return settings.replace("registry", home=tmp_path / "bentoml-home")


def test_save_list_load_round_trip(project: tuple[Path, Settings], store: Settings) -> None:
    root, _ = project
    models = store.paths.models
    saved = registry.save_version(models / BUNDLE_DIR, models / METRICS_FILE, store, root=root)

    assert saved.tag == f"{store.registry.model_name}:{saved.version}"
    offline = json.loads((models / METRICS_FILE).read_text())["served"]
    assert saved.model == "als_ranker" and saved.metrics == pytest.approx(offline)  # pinned by the project
    assert saved.data_version == "untracked"  # this project has no data.dvc
    assert saved.params["als"]["factors"] == 16 and saved.params["ranker"]["enabled"] is True
    assert saved.path.is_relative_to(store.registry.home)
    assert [v.version for v in registry.versions(store, root)] == [saved.version]
    # saving the same training again adds no version
    assert registry.save_version(models / BUNDLE_DIR, models / METRICS_FILE, store, root=root) == saved
    assert len(registry.versions(store, root)) == 1

    original = ModelBundle.load(models / BUNDLE_DIR)
    loaded = ModelBundle.load(saved.bundle_dir)
    users = np.arange(20)
    np.testing.assert_array_equal(loaded.recommend(users, 10)[0], original.recommend(users, 10)[0])
    assert (saved.backtest_dir / "bundle.json").exists()

    # a genuine BentoML store: BentoML's own command line lists the version
    env = {**os.environ, "BENTOML_HOME": str(store.registry.home), "BENTOML_DO_NOT_TRACK": "True"}
    listed = subprocess.run(
        [BENTOML, "models", "list", "-o", "json"], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert saved.tag in listed.stdout


def test_the_configured_store_wins_over_the_home_bentoml_already_resolved(
    project: tuple[Path, Settings], tmp_path: Path
) -> None:
    """BentoML resolves BENTOML_HOME once, on first use, and caches it for the process. A process that touched
    BentoML with another home (a service, a notebook) must still save into the configured store."""
    root, settings = project
    other, configured = tmp_path / "other-home", tmp_path / "configured-home"
    script = f"""
import os
from pathlib import Path
os.environ["BENTOML_HOME"] = {str(other)!r}
from bentoml._internal.configuration.containers import BentoMLContainer
assert BentoMLContainer.model_store.get()  # BentoML now caches {str(other)!r} for this process
from recflow.ops import gate, registry
from recflow.config import load_settings
settings = load_settings({str(root / "params.yaml")!r}).replace("registry", home=Path({str(configured)!r}))
models = Path({str(settings.paths.models)!r})
print(registry.save_version(models / "bundle", models / "metrics.json", settings, root=Path({str(root)!r})).tag)
"""
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    name, version = done.stdout.strip().splitlines()[-1].split(":")
    assert (configured / "models" / name / version / "model.yaml").exists()
    assert not any((other / "models").iterdir())


def test_nothing_in_production_is_a_clear_error(project: tuple[Path, Settings], store: Settings) -> None:
    root, _ = project
    assert registry.production(store, root) is None
    with pytest.raises(NoProductionError, match="recflow deploy"):
        registry.load_production_bundle(store, root)
    with pytest.raises(NoProductionError, match="nothing to roll back"):
        registry.rollback(store, root)


def test_gate_refuses_a_worse_model_and_rollback_restores_the_previous_one(
    project: tuple[Path, Settings], store: Settings
) -> None:
    root, _ = project
    first = registry.deploy(store, root=root, user="alice")
    assert first.promoted and "first deployment" in first.reason
    good = first.candidate
    assert registry.production(store, root) == good
    users = np.arange(30)
    good_answers = registry.load_production_bundle(store, root)[1].recommend(users, 10)
    with pytest.raises(NoProductionError, match="nothing to roll back to"):
        registry.rollback(store, root)

    train_and_evaluate(worse(store))
    refused = registry.deploy(store, root=root, user="bob")
    assert not refused.promoted
    assert refused.candidate.model == "als" and refused.previous == good
    assert refused.candidate_score is not None and refused.production_score is not None
    assert refused.standard_error is not None and refused.standard_error > 0
    allowance = max(store.registry.tolerance, refused.standard_error)
    assert refused.candidate_score < refused.production_score - allowance  # worse by more than the window's noise
    assert f"paired standard error {refused.standard_error:.4f}" in refused.reason
    assert "refused" in refused.reason and f"production stays {good.version}" in refused.reason
    assert registry.production(store, root) == good
    # scored on the same window as `recflow evaluate`: both scores equal the offline ones
    assert refused.candidate_score == pytest.approx(refused.candidate.metrics["ndcg@10"])
    assert refused.production_score == pytest.approx(good.metrics["ndcg@10"])

    # a score within the tolerance of production's promotes (at exactly the boundary)
    gap = refused.production_score - refused.candidate_score
    lenient = store.replace("registry", tolerance=gap + 1e-9)
    tie = registry.deploy(lenient, root=root, user="carol")
    assert tie.promoted and "passed the gate" in tie.reason
    assert tie.candidate == refused.candidate  # the same version, not saved twice
    assert registry.production(store, root) == refused.candidate

    # a better candidate (the good configuration, trained again) is promoted over the worse production
    train_and_evaluate(store)
    better = registry.deploy(store, root=root, user="dave")
    assert better.promoted and better.previous == refused.candidate
    assert better.candidate_score is not None and better.production_score is not None
    assert better.candidate_score > better.production_score

    records = registry.history(store, root)
    assert [(r["action"], r["user"]) for r in records] == [
        ("promote", "alice"),
        ("refuse", "bob"),
        ("promote", "carol"),
        ("promote", "dave"),
    ]
    assert records[1]["version"] == refused.candidate.version and records[1]["production_before"] == good.version
    assert records[1]["standard_error"] == refused.standard_error and records[0]["standard_error"] is None
    assert records[1]["candidate_metrics"]["ndcg@10"] < records[1]["production_metrics"]["ndcg@10"]
    assert records[1]["candidate_score"] == pytest.approx(refused.candidate_score)

    began = time.perf_counter()
    restored = registry.rollback(store, root, user="erin")
    seconds = time.perf_counter() - began
    print(f"rollback took {seconds * 1000:.1f} ms")
    assert seconds < 5.0
    assert restored == refused.candidate == registry.production(store, root)
    version, bundle = registry.load_production_bundle(store, root)
    assert version == restored and bundle.ranker is None
    assert registry.rollback(store, root) == good  # rollback again: one more step back
    answers = registry.load_production_bundle(store, root)[1].recommend(users, 10)
    np.testing.assert_array_equal(answers[0], good_answers[0])  # the same answers as when it was first deployed
    np.testing.assert_allclose(answers[1], good_answers[1])
    with pytest.raises(NoProductionError, match="nothing to roll back to"):
        registry.rollback(store, root)
    last = registry.history(store, root)[-1]
    assert last["action"] == "rollback" and last["version"] == good.version
    assert last["from"] == refused.candidate.version


def test_rollback_does_not_wait_for_a_running_gate_and_the_gate_then_promotes_nothing(
    project: tuple[Path, Settings], store: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = project
    good = registry.deploy(store, root=root).candidate
    train_and_evaluate(worse(store))
    bad = registry.deploy(store, root=root, force=True).candidate  # production: bad, and good before it
    train_and_evaluate(store)

    # A spy, not a mock: the real gate runs, and while it runs a rollback happens (as from another terminal).
    real_judge = gate.judge
    rolled: list[float] = []

    def judge_while_someone_rolls_back(*args: Any, **kwargs: Any) -> gate.Verdict:
        began = time.perf_counter()
        worker = threading.Thread(target=lambda: registry.rollback(store, root, user="oncall"), daemon=True)
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), "rollback waited for the gate"
        rolled.append(time.perf_counter() - began)
        return real_judge(*args, **kwargs)

    monkeypatch.setattr(gate, "judge", judge_while_someone_rolls_back)
    with pytest.raises(RegistryError, match=f"production changed to {good.version} while the gate compared"):
        registry.deploy(store, root=root)
    print(f"rollback during the gate took {rolled[0] * 1000:.1f} ms")
    assert registry.production(store, root) == good
    assert [r["action"] for r in registry.history(store, root)] == ["promote", "promote", "rollback"]
    assert bad.version == registry.history(store, root)[-1]["from"]


def test_gate_scores_a_version_with_other_id_maps_by_external_id(project: tuple[Path, Settings]) -> None:
    """Known answer: the same ALS model with its users and items stored in another order (as a version trained
    from older features has them) scores exactly what it scores with the current order."""
    _, settings = project
    # ALS alone: the ranker's feature context is indexed by user and item too, and is not reordered here
    bundle = dataclasses.replace(
        ModelBundle.load(settings.paths.models / BACKTEST_DIR), ranker=None, kind="als", item_item=None, events=None
    )
    rng = np.random.default_rng(0)
    users, items = rng.permutation(len(bundle.user_ids)), rng.permutation(len(bundle.item_ids))
    shuffled = dataclasses.replace(
        bundle,
        user_ids=bundle.user_ids[users],
        item_ids=bundle.item_ids[items],
        user_factors=bundle.user_factors[users],
        item_factors=bundle.item_factors[items],
        history=bundle.history[users][:, items],
        popularity=bundle.popularity[items],
    )
    scores = score_on_current_window([bundle, shuffled], settings.paths.features, settings)
    assert scores.users == scores.test_users > 0
    assert scores.metrics[1] == pytest.approx(scores.metrics[0])
    assert scores.metrics[0]["ndcg@10"] > 0


def test_gate_compares_with_an_older_version_on_the_current_window(tmp_path: Path) -> None:
    """Production was trained before the last quarter of the events arrived: after they are ingested and a
    candidate trained, both versions are scored on the new test window, on the users both know."""
    write_small_project(tmp_path, **SERVING_PROJECT)
    settings = load_settings(tmp_path / "params.yaml")
    settings = settings.replace("paths", **{name: tmp_path / getattr(settings.paths, name) for name in MOVED})
    settings = settings.replace("registry", home=tmp_path / "store")
    events = generate_events(settings.generate)
    seconds = pc.cast(events[TIMESTAMP], pa.int64()).to_numpy()  # sorted by time
    cut = int(len(seconds) * 0.75)

    def arrive(rows: pa.Table) -> None:
        ingest_table(
            rows,
            source="events",
            store=settings.paths.store,
            rejected=settings.paths.rejected,
            settings=settings.events,
        )
        build_features(settings.paths.store, settings.paths.features, settings)
        train_and_evaluate(settings)

    arrive(events.slice(0, cut))
    old = registry.deploy(settings, root=tmp_path).candidate
    arrive(events.slice(cut))
    decision = registry.deploy(settings, root=tmp_path)
    print(f"{decision.action}: {decision.reason}")

    assert decision.previous == old and decision.candidate != old
    assert decision.candidate_score is not None and decision.production_score is not None
    new_test_users = json.loads((settings.paths.models / METRICS_FILE).read_text())["test_users"]
    assert 0 < decision.users <= new_test_users
    assert decision.production_score != pytest.approx(old.metrics["ndcg@10"])  # re-scored, not the old figure
    # the same world, three weeks apart: the older model still finds relevant items on the new window (with a
    # wrong id mapping it would score about nothing)
    assert decision.production_score > 0.5 * decision.candidate_score
    assert decision.standard_error is not None
    allowance = max(settings.registry.tolerance, decision.standard_error)
    assert decision.promoted == (decision.candidate_score >= decision.production_score - allowance)


def test_deploy_refuses_outputs_of_different_trainings_and_names_the_stale_one(
    project: tuple[Path, Settings], store: Settings, tmp_path: Path
) -> None:
    """Regression (issue 12): bundles and metrics were paired by timestamps, so a crash between saves or a `dvc
    checkout` of one output could deploy a mixed set. One training id ties them; a mismatch is refused."""
    root, _ = project
    models = tmp_path / "models"
    shutil.copytree(store.paths.models, models)
    ids = {json.loads((models / d / "bundle.json").read_text())["info"]["training_id"] for d in ("bundle", "backtest")}
    assert len(ids) == 1 and json.loads((models / METRICS_FILE).read_text())["training_id"] in ids

    metrics = json.loads((models / METRICS_FILE).read_text())
    (models / METRICS_FILE).write_text(json.dumps({**metrics, "training_id": "an-older-training"}))
    with pytest.raises(ModelNotFoundError, match=r"measures another training.*run `recflow evaluate`"):
        registry.save_version(models / BUNDLE_DIR, models / METRICS_FILE, store, root=root)

    (models / METRICS_FILE).write_text(json.dumps(metrics))
    backtest_meta = json.loads((models / "backtest/bundle.json").read_text())
    backtest_meta["info"]["training_id"] = "an-older-training"
    (models / "backtest/bundle.json").write_text(json.dumps(backtest_meta))
    with pytest.raises(ModelNotFoundError, match="come from different trainings"):
        registry.save_version(models / BUNDLE_DIR, models / METRICS_FILE, store, root=root)


def test_a_production_the_gate_cannot_read_is_replaced_only_with_force(
    project: tuple[Path, Settings], store: Settings
) -> None:
    """Production's backtest has a ranker of other features (a model of an earlier recflow): the gate cannot score
    it, so deploy refuses with what to do, and `--force` promotes the candidate with the reason recorded."""
    root, _ = project
    old = registry.deploy(store, root=root).candidate
    ranker = old.backtest_dir / "ranker.txt"
    ranker.write_text(ranker.read_text().replace("item_item_rank", "item_item_old", 1))
    train_and_evaluate(store)
    with pytest.raises(RegistryError, match=rf"cannot compare .* with production {old.version}.*--force"):
        registry.deploy(store, root=root)
    assert registry.production(store, root) == old
    forced = registry.deploy(store, root=root, force=True)
    assert forced.promoted and forced.reason.startswith("forced (--force); the gate could not compare")
    assert registry.production(store, root) == forced.candidate
