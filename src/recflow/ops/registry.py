"""The model registry: deployable versions in the BentoML model store, the production pointer, the promotion
gate's record and rollback.

One version is one BentoML model (`<registry.model_name>:<version>`) holding
    bundle/        the deployable bundle (ALS factors with id maps, ranker, popularity, action weights, decay)
    backtest/      the backtest bundle of the same training, which the gate re-scores on later test windows
    metrics.json   the offline metrics of `recflow evaluate` for that training
with the data version (md5 of data.dvc), trained-at, parameters and metrics in the model's labels and metadata.

The store is the BentoML home `registry.home` (default `<project>/.bentoml`); every call of BentoML's public
`bentoml.models` API passes the store explicitly (`recflow.serving.bentoml_adapter.model_store`), so it does not
matter whether BentoML already resolved its own home in this process. Beside the
models, `<home>/recflow/` holds the production pointer (`production.json`, with the stack of earlier
production versions that rollback returns to) and the deployment history (`history.jsonl`, every promotion,
refusal and rollback), both written atomically under a lock, so a service in the same project finds them.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from recflow.config import Settings
from recflow.errors import ModelNotFoundError, NoProductionError, RecflowError, RegistryError
from recflow.files import atomic_path, fsync_tree

if TYPE_CHECKING:  # the model code is imported when needed: rollback and listing stay fast
    from bentoml import Model

    from recflow.model.bundle import ModelBundle
    from recflow.serving.bentoml_adapter import ModelStore

logger = logging.getLogger(__name__)

VERSION_BUNDLE = "bundle"  # inside a version: the deployable bundle,
VERSION_BACKTEST = "backtest"  # the backtest bundle of the same training,
VERSION_METRICS = "metrics.json"  # and `recflow evaluate`'s metrics of it
STATE_DIR = "recflow"  # inside the BentoML home
PRODUCTION_FILE = "production.json"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".lock"
UNTRACKED = "untracked"


@dataclass(frozen=True)
class ModelVersion:
    """One deployable version in the model store."""

    tag: str  # "<model_name>:<version>"
    version: str
    created_at: datetime  # when it was saved into the store (UTC)
    trained_at: str  # when `recflow train` wrote its bundle (ISO-8601, UTC)
    data_version: str  # md5 of the data in data.dvc, or "untracked"
    metrics: dict[str, float]  # offline metrics of the deployed model on the test window of its training
    params: dict[str, Any]  # the parameters it was trained with
    model: str  # the served kind: popularity, item_knn, ease, als or als_ranker
    path: Path  # its folder in the model store

    @property
    def bundle_dir(self) -> Path:
        return self.path / VERSION_BUNDLE

    @property
    def backtest_dir(self) -> Path:
        return self.path / VERSION_BACKTEST


@dataclass(frozen=True)
class Decision:
    """What `deploy` decided about one candidate, and why; the same record is appended to the history."""

    promoted: bool
    reason: str
    candidate: ModelVersion
    previous: ModelVersion | None  # production before the decision
    metric: str  # e.g. "ndcg@10"
    candidate_score: float | None  # on the current test window (None when there was nothing to compare with)
    production_score: float | None
    tolerance: float
    users: int  # test users both versions were scored on
    standard_error: float | None  # of the paired per-user difference (None when nothing was compared)
    user: str
    at: datetime

    @property
    def production(self) -> ModelVersion | None:
        """Production after the decision."""
        return self.candidate if self.promoted else self.previous

    @property
    def action(self) -> str:
        """What the history records: promote, refuse, or unchanged (the candidate already was production)."""
        if self.promoted:
            return "promote"
        return "unchanged" if self.previous == self.candidate else "refuse"


def bentoml_home(settings: Settings, root: Path = Path(".")) -> Path:
    """The BentoML home of this project: `registry.home`, relative to the project folder `root`."""
    return (root / settings.registry.home).absolute()


def production_file(settings: Settings, root: Path = Path(".")) -> Path:
    """The production pointer; its modification time changes whenever production changes (for hot reload)."""
    return bentoml_home(settings, root) / STATE_DIR / PRODUCTION_FILE


def data_version(root: Path = Path(".")) -> str:
    """The md5 of the data tracked by `root/data.dvc`, or "untracked" when there is no data.dvc."""
    dvc_file = root / "data.dvc"
    if not dvc_file.exists():
        return UNTRACKED
    try:
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
        return str(outs[0]["md5"])
    except (yaml.YAMLError, AttributeError, IndexError, KeyError, TypeError) as exc:
        raise RegistryError(f"{dvc_file} has no outs[0].md5 ({exc}): run `dvc add data` again") from exc


def save_version(
    bundle_dir: Path,
    metrics_file: Path,
    settings: Settings,
    *,
    root: Path = Path("."),
    backtest_dir: Path | None = None,
) -> ModelVersion:
    """Save a trained bundle, the backtest bundle of the same training (default: beside it) and its metrics as
    a new version in the model store, and return it. Saving the same files again returns the existing version."""
    import bentoml

    from recflow.model.bundle import BUNDLE_FILE, ModelBundle
    from recflow.model.evaluate import SERVED as SERVED_METRICS
    from recflow.model.training import BACKTEST_DIR

    bundle_dir, metrics_file = root / bundle_dir, root / metrics_file
    backtest_dir = root / backtest_dir if backtest_dir else bundle_dir.parent / BACKTEST_DIR
    for folder in (bundle_dir, backtest_dir):
        if not (folder / BUNDLE_FILE).exists():
            raise ModelNotFoundError(f"no trained model in {folder}: run `recflow train` (or dvc repro) first")
    if not metrics_file.exists():
        raise ModelNotFoundError(f"no metrics in {metrics_file}: run `recflow evaluate` (or dvc repro) first")
    _same_training(bundle_dir, backtest_dir, metrics_file)
    store = _model_store(settings, root)
    digest = _content_hash(bundle_dir, backtest_dir, metrics_file)
    for existing in _models(settings, store):
        if existing.info.labels.get("content_hash") == digest:
            logger.info("%s is already saved as %s", bundle_dir, existing.tag)
            return _version(existing)

    meta = ModelBundle.read_meta(bundle_dir)
    model = str(meta.get("kind", "als_ranker" if meta["has_ranker"] else "als"))  # the kind validation chose
    all_metrics = json.loads(metrics_file.read_text())
    if SERVED_METRICS not in all_metrics:
        raise ModelNotFoundError(f"{metrics_file} has no metrics of the served model: run `recflow evaluate` again")
    created = datetime.now(UTC)
    version = f"{created:%Y%m%d-%H%M%S}-{digest[:8]}"
    metadata = {
        "created_at": created.isoformat(timespec="seconds"),
        "trained_at": str(meta["info"].get("trained_at", "")),
        "data_version": data_version(root),
        "model": model,
        "metrics": {name: float(value) for name, value in all_metrics[SERVED_METRICS].items()},
        "params": _params(meta, settings),
    }
    labels = {"content_hash": digest, "data_version": metadata["data_version"], "model": model}
    tag = f"{settings.registry.model_name}:{version}"
    with bentoml.models.create(tag, labels=labels, metadata=metadata, _model_store=store) as saved:
        target = Path(saved.path)
        shutil.copytree(bundle_dir, target / VERSION_BUNDLE)
        shutil.copytree(backtest_dir, target / VERSION_BACKTEST)
        shutil.copy2(metrics_file, target / VERSION_METRICS)
    fsync_tree(Path(store.get(saved.tag).path))  # BentoML moved the version into its store: survive a power cut
    logger.info("saved %s as %s", bundle_dir, saved.tag)
    return get_version(settings, version, root)


def versions(settings: Settings, root: Path = Path(".")) -> list[ModelVersion]:
    """Every version in the store, oldest first."""
    found = [_version(m) for m in _models(settings, _model_store(settings, root))]
    return sorted(found, key=lambda v: (v.created_at, v.version))


def get_version(settings: Settings, version: str, root: Path = Path(".")) -> ModelVersion:
    """One version by its version string (the part after ':' of the tag)."""
    import bentoml
    from bentoml.exceptions import NotFound

    tag = f"{settings.registry.model_name}:{version}"
    try:
        return _version(bentoml.models.get(tag, _model_store=_model_store(settings, root)))
    except NotFound:
        raise RegistryError(
            f"version {version} is not in the model store {bentoml_home(settings, root)}; "
            "`recflow versions` lists the versions it has"
        ) from None


def production(settings: Settings, root: Path = Path(".")) -> ModelVersion | None:
    """The version in production, or None when nothing was deployed yet."""
    pointer = _read_pointer(settings, root)
    return None if pointer is None else get_version(settings, pointer["version"], root)


def load_production_bundle(settings: Settings, root: Path = Path(".")) -> tuple[ModelVersion, ModelBundle]:
    """The production version and its deployable bundle (what the service loads at startup and on reload)."""
    from recflow.model.bundle import ModelBundle

    current = production(settings, root)
    if current is None:
        raise NoProductionError(
            f"no model in production in {bentoml_home(settings, root)}: run `recflow train`, `recflow evaluate` "
            "and `recflow deploy` first"
        )
    return current, ModelBundle.load(current.bundle_dir)


def deploy(settings: Settings, *, root: Path = Path("."), user: str | None = None, force: bool = False) -> Decision:
    """Save the trained bundle (`paths.models`/bundle) as a candidate version and promote it to production if it
    passes the gate: its NDCG@k on the current test window is at least production's (re-scored on the same
    window) minus the larger of `registry.tolerance` and one standard error of the paired per-user difference
    (gate.py). `force` promotes regardless (the scores are still recorded).

    The gate runs outside the store's lock, so a rollback never waits for it; if production changes while it
    runs, nothing is promoted and the error says to deploy again."""
    from recflow.model.evaluate import METRICS_FILE
    from recflow.model.training import BUNDLE_DIR
    from recflow.ops.gate import Verdict, gate_metric, judge

    models = settings.paths.models
    with _locked(settings, root):
        candidate = save_version(models / BUNDLE_DIR, models / METRICS_FILE, settings, root=root)
        previous = production(settings, root)
    metric, tolerance = gate_metric(settings), settings.registry.tolerance
    verdict: Verdict | None = None
    if previous is None:
        promoted, reason = True, "first deployment: nothing in production to compare with"
    elif previous.version == candidate.version:
        promoted, reason = False, f"{candidate.version} is already in production"
    else:
        try:
            verdict = judge(candidate.backtest_dir, previous.backtest_dir, root / settings.paths.features, settings)
        except RecflowError as exc:
            if not force:
                raise RegistryError(
                    f"the gate cannot compare {candidate.version} with production {previous.version}: {exc}; "
                    "`recflow deploy --force` promotes it without the comparison"
                ) from exc
            promoted, reason = True, f"forced (--force); the gate could not compare: {exc}"
        else:
            scores = (
                f"{metric} {verdict.candidate:.4f} vs production {previous.version} {verdict.production:.4f} "
                f"on the current test window ({verdict.users} users; paired standard error "
                f"{verdict.standard_error:.4f}, tolerance {tolerance})"
            )
            if verdict.passed:
                promoted, reason = True, f"passed the gate: {scores}"
            elif force:
                promoted, reason = True, f"forced past the gate (--force): {scores}"
            else:
                promoted, reason = False, f"refused: {scores}; production stays {previous.version}"
    decision = Decision(
        promoted=promoted,
        reason=reason,
        candidate=candidate,
        previous=previous,
        metric=metric,
        candidate_score=verdict.candidate if verdict else None,
        production_score=verdict.production if verdict else None,
        tolerance=tolerance,
        users=verdict.users if verdict else 0,
        standard_error=verdict.standard_error if verdict else None,
        user=user or _os_user(),
        at=datetime.now(UTC),
    )
    with _locked(settings, root):
        pointer = _read_pointer(settings, root)
        if (pointer and pointer["version"]) != (previous and previous.version):
            now = pointer["version"] if pointer else "none"
            raise RegistryError(
                f"production changed to {now} while the gate compared {candidate.version} with "
                f"{previous.version if previous else 'none'}: run `recflow deploy` again"
            )
        if promoted:
            stack = [*pointer["previous"], pointer["version"]] if pointer else []
            _write_pointer(settings, root, candidate.version, stack, decision.at)
        _append_history(settings, root, _decision_record(decision))
    logger.info("deploy %s: %s", candidate.version, reason)
    return decision


def rollback(settings: Settings, root: Path = Path("."), user: str | None = None) -> ModelVersion:
    """Return production to the version before it (undoing the last promotion); recorded in the history."""
    with _locked(settings, root):
        pointer = _read_pointer(settings, root)
        if pointer is None:
            raise NoProductionError(f"nothing to roll back: no model in production in {bentoml_home(settings, root)}")
        if not pointer["previous"]:
            raise NoProductionError(
                f"nothing to roll back to: {pointer['version']} is the only version that has been in production"
            )
        *stack, target = pointer["previous"]
        restored = get_version(settings, target, root)  # fails before the pointer moves if it was deleted
        at = datetime.now(UTC)
        _write_pointer(settings, root, restored.version, stack, at)
        _append_history(
            settings,
            root,
            {
                "action": "rollback",
                "at": at.isoformat(timespec="seconds"),
                "user": user or _os_user(),
                "version": restored.version,
                "from": pointer["version"],
                "reason": f"rolled back from {pointer['version']} to {restored.version}",
            },
        )
    logger.info("rolled back from %s to %s", pointer["version"], restored.version)
    return restored


def history(settings: Settings, root: Path = Path(".")) -> list[dict[str, Any]]:
    """Every deployment decision and rollback, oldest first."""
    path = _state_dir(settings, root) / HISTORY_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (e.g. a container user without a passwd entry)
        return "unknown"


def _model_store(settings: Settings, root: Path) -> ModelStore:
    from recflow.serving.bentoml_adapter import model_store

    return model_store(bentoml_home(settings, root) / "models")


def _models(settings: Settings, store: ModelStore) -> list[Model]:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return bentoml.models.list(settings.registry.model_name, _model_store=store)
    except NotFound:
        return []


def _same_training(bundle_dir: Path, backtest_dir: Path, metrics_file: Path) -> None:
    """The deployable bundle, the backtest bundle and metrics.json must come from one `recflow train` (and the
    `recflow evaluate` of it): their training ids must agree, else the stale output is named."""
    from recflow.model.bundle import ModelBundle

    ids = {
        "deployable": ModelBundle.read_meta(bundle_dir)["info"].get("training_id"),
        "backtest": ModelBundle.read_meta(backtest_dir)["info"].get("training_id"),
        "metrics": json.loads(metrics_file.read_text()).get("training_id"),
    }
    if ids["deployable"] != ids["backtest"]:
        raise ModelNotFoundError(
            f"{bundle_dir} and {backtest_dir} come from different trainings ({ids['deployable']} vs "
            f"{ids['backtest']}), e.g. after a crash or a `dvc checkout` of one of them: run `recflow train` again"
        )
    if ids["metrics"] != ids["backtest"]:
        raise ModelNotFoundError(
            f"{metrics_file} measures another training ({ids['metrics']}) than {backtest_dir} ({ids['backtest']}): "
            "run `recflow evaluate` to measure this training"
        )


def _version(model: Model) -> ModelVersion:
    meta: dict[str, Any] = dict(model.info.metadata)  # BentoML types values as any metadata; ours are JSON
    return ModelVersion(
        tag=str(model.tag),
        version=str(model.tag.version),
        created_at=datetime.fromisoformat(meta["created_at"]),
        trained_at=str(meta["trained_at"]),
        data_version=str(meta["data_version"]),
        metrics={name: float(value) for name, value in meta["metrics"].items()},
        params=dict(meta["params"]),
        model=str(meta["model"]),
        path=Path(model.path),
    )


def _params(bundle_meta: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The parameters a version was trained with: the ALS values it used (tuned or pinned) and the sections of
    params.yaml that shaped it, as plain JSON values."""
    sections = {name: asdict(getattr(settings, name)) for name in ("features", "candidates", "ranker")}
    plain = _without_nulls(json.loads(json.dumps(sections, default=str)))  # BentoML metadata takes no None
    chosen = {"half_life_days": bundle_meta["half_life_days"], "kind": bundle_meta.get("kind", "")}
    return {"als": bundle_meta["als_params"], "actions": dict(settings.events.actions), "chosen": chosen, **plain}


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def _content_hash(*paths: Path) -> str:
    digest = hashlib.md5()
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(f"{file.relative_to(path.parent) if path.is_dir() else file.name}\0".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def _state_dir(settings: Settings, root: Path) -> Path:
    return bentoml_home(settings, root) / STATE_DIR


@contextmanager
def _locked(settings: Settings, root: Path) -> Iterator[None]:
    """Serialise deploys and rollbacks of one store (an exclusive lock on a file in it)."""
    state = _state_dir(settings, root)
    state.mkdir(parents=True, exist_ok=True)
    with (state / LOCK_FILE).open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_pointer(settings: Settings, root: Path) -> dict[str, Any] | None:
    path = production_file(settings, root)
    if not path.exists():
        return None
    try:
        pointer = json.loads(path.read_text())
        return {"version": str(pointer["version"]), "previous": [str(v) for v in pointer["previous"]]}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RegistryError(f"{path} is not a production pointer ({exc}): deploy again or restore it") from exc


def _write_pointer(settings: Settings, root: Path, version: str, previous: list[str], at: datetime) -> None:
    payload = {"version": version, "since": at.isoformat(timespec="seconds"), "previous": previous}
    with atomic_path(production_file(settings, root)) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))


def _append_history(settings: Settings, root: Path, record: dict[str, Any]) -> None:
    """Append one record: the whole file is rewritten atomically (it holds one short line per deployment)."""
    path = _state_dir(settings, root) / HISTORY_FILE
    old = path.read_text() if path.exists() else ""
    with atomic_path(path) as tmp:
        tmp.write_text(old + json.dumps(record) + "\n")


def _decision_record(decision: Decision) -> dict[str, Any]:
    return {
        "action": decision.action,
        "at": decision.at.isoformat(timespec="seconds"),
        "user": decision.user,
        "version": decision.candidate.version,
        "production_before": decision.previous.version if decision.previous else None,
        "metric": decision.metric,
        "candidate_score": decision.candidate_score,
        "production_score": decision.production_score,
        "tolerance": decision.tolerance,
        "standard_error": decision.standard_error,
        "users": decision.users,
        "candidate_metrics": decision.candidate.metrics,
        "production_metrics": decision.previous.metrics if decision.previous else None,
        "reason": decision.reason,
    }
