"""Typed settings read from params.yaml: the one source of truth for paths and parameters."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from recflow.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")
SPLIT_METHODS = ("auto", "global_time", "per_user", "random")
MODEL_KINDS = ("popularity", "item_knn", "ease", "als", "als_ranker")


@dataclass(frozen=True)
class Paths:
    inbox: Path = Path("data/inbox")
    store: Path = Path("data/events")
    rejected: Path = Path("data/rejected")
    features: Path = Path("features")
    models: Path = Path("models")
    reports: Path = Path("reports")


@dataclass(frozen=True)
class EventSettings:
    actions: dict[str, float] = field(
        default_factory=lambda: {"view": 0.5, "click": 1.0, "add_to_cart": 1.5, "purchase": 2.0}
    )
    max_future_skew_seconds: float = 300.0
    max_id_length: int = 256


@dataclass(frozen=True)
class GenerateSettings:
    seed: int = 42
    users: int = 5000
    items: int = 2000
    events: int = 300_000
    days: int = 60
    groups: int = 12


@dataclass(frozen=True)
class SplitSettings:
    method: str = "auto"  # auto | global_time | per_user | random (auto: per_user, or random when time says nothing)
    test_fraction: float = 0.2
    validation_fraction: float = 0.2
    seed: int = 0  # the random split's seed


@dataclass(frozen=True)
class FeatureSettings:
    half_life_days: float | None = None  # pinned time decay; null: chosen by validation (selection.half_lives_days)
    split: SplitSettings = field(default_factory=SplitSettings)


@dataclass(frozen=True)
class TuneSettings:
    enabled: bool = True
    budget_seconds: float | None = None  # wall-clock cap (null: none; trials alone keep dvc repro deterministic)
    max_trials: int = 16
    max_users: int = 5000
    search: tuple[str, ...] = ("alpha", "regularization", "factors")


@dataclass(frozen=True)
class ALSSettings:
    factors: int = 64
    regularization: float = 0.05
    alpha: float = 10.0
    iterations: int = 15
    refit_iterations: int = 5
    random_state: int = 7
    tune: TuneSettings = field(default_factory=TuneSettings)


@dataclass(frozen=True)
class CandidateSettings:
    n: int = 100
    popular: int = 20
    item_item: int = 50  # plus the top items of the item-to-item model (EASE or item-kNN) not proposed yet


@dataclass(frozen=True)
class SelectionSettings:
    """What the train stage chooses on validation folds inside the training data (recflow/model/selection.py)."""

    models: tuple[str, ...] = ("popularity", "item_knn", "ease", "als", "als_ranker")
    half_lives_days: tuple[float, ...] = (0.0, 30.0, 180.0)  # decay candidates; 0: no decay
    popularity_windows_days: tuple[float, ...] = (0.0, 1.0, 7.0, 30.0)  # 0: all time
    ease_lambdas: tuple[float, ...] = (10.0, 50.0, 200.0, 1000.0)
    ease_max_items: int = 10_000  # EASE's dense item x item matrix: 400 MB of float32 at 10k items
    knn_neighbours: int = 100
    min_users: int = 20  # tuning and selecting users per fold below which the fold is not used (with a warning)
    max_users: int = 5000  # validation users per fold (a fixed random sample above it)
    select_share: float = 0.4  # share of each fold's users held out to choose the model; the rest tune and train
    bootstrap: int = 1000  # resamples of users for the 95% intervals
    seed: int = 0


@dataclass(frozen=True)
class RankerSettings:
    enabled: bool = True
    n_estimators: int = 300
    learning_rate: float = 0.05
    num_leaves: int = 4
    min_child_samples: int = 20
    early_stopping_rounds: int = 30
    max_train_users: int = 20_000
    popularity_windows_days: tuple[float, ...] = (1.0, 7.0, 30.0)
    recent_items: int = 5


@dataclass(frozen=True)
class EvaluateSettings:
    k: int = 10
    recall_k: int = 20
    curve_ks: tuple[int, ...] = (1, 5, 10, 20, 50, 100)
    max_users: int = 20_000
    seed: int = 0


@dataclass(frozen=True)
class ServiceSettings:
    """The HTTP service (bentos/service.py). `token` and `redis_url` may be overridden by the environment
    variables RECFLOW_SERVICE_TOKEN and RECFLOW_SERVICE_REDIS_URL (see `resolved`)."""

    token: str | None = None  # bearer token required by the write endpoints (/events, /reload); null: open
    max_body_bytes: int = 1_048_576  # larger request bodies are refused with 413
    max_events: int = 1000  # events per POST /events (and recent_events per /recommend)
    k_max: int = 200  # the largest k a request may ask for
    redis_url: str | None = None  # user state in Redis (shared by workers and replicas); null: state_path
    redis_prefix: str = "recflow:state:"  # key prefix of the user state in Redis
    state_path: Path = Path("models/serving/user_state.jsonl")  # append-only log of user state without Redis
    reload_check_seconds: float = 5.0  # how often a request may check whether production changed (0: never)
    workers: int = 1  # service processes; more than one needs redis_url (the local state log serves one process)

    def __post_init__(self) -> None:
        if not 1 <= self.k_max <= 200:
            raise ConfigError(f"service.k_max must be between 1 and 200 (the API's limit), got {self.k_max}")
        for name in ("max_body_bytes", "max_events", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"service.{name} must be at least 1, got {getattr(self, name)}")
        if self.reload_check_seconds < 0:
            raise ConfigError(f"service.reload_check_seconds must not be negative, got {self.reload_check_seconds}")

    def resolved(self, environ: Mapping[str, str]) -> ServiceSettings:
        """These settings with the environment's overrides applied; more than one worker needs Redis."""
        resolved = dataclasses.replace(
            self,
            token=environ.get("RECFLOW_SERVICE_TOKEN") or self.token,
            redis_url=environ.get("RECFLOW_SERVICE_REDIS_URL") or self.redis_url,
        )
        if resolved.workers > 1 and not resolved.redis_url:
            raise ConfigError(
                f"service.workers is {resolved.workers}, which needs the user state in Redis: set service.redis_url "
                "(or RECFLOW_SERVICE_REDIS_URL); the local user-state log (service.state_path) serves one process"
            )
        return resolved


@dataclass(frozen=True)
class EventLogSettings:
    """The real-time event log (recflow.stream.log) and its consumer (recflow.stream.consumer). The environment
    variable RECFLOW_REDIS_URL overrides `redis_url` (see `resolved`)."""

    redis_url: str | None = None  # null: the local spool file (embedded, single machine)
    stream: str = "recflow:events"  # Redis stream the events are appended to
    group: str = "recflow-store"  # consumer group that stores them
    consumer: str | None = None  # consumer name; null: the host name (a restart takes back its own pending entries)
    maxlen: int = 1_000_000  # length cap: acknowledged entries beyond it are trimmed (never unacknowledged ones)
    batch_size: int = 10_000  # entries read and stored per batch (one store write each)
    block_ms: int = 1000  # how long one read waits for new entries
    linger_ms: int = 200  # after the first new entry, wait up to this long to fill a batch (fewer store files)
    claim_idle_ms: int = 60_000  # pending entries of another consumer idle this long are claimed (dead consumer)
    max_deliveries: int = 5  # delivered this often: stored one by one; the one a consumer dies on is dead-lettered
    dead_letter_stream: str = "recflow:events:dead"  # poison entries with their reason
    spool: Path = Path("spool")  # folder of the spool file and its consumer position (outside data/)

    def __post_init__(self) -> None:
        for name in ("maxlen", "batch_size", "max_deliveries"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eventlog.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("block_ms", "linger_ms", "claim_idle_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"eventlog.{name} must not be negative, got {getattr(self, name)}")
        if self.stream == self.dead_letter_stream:
            raise ConfigError("eventlog.dead_letter_stream must differ from eventlog.stream")

    def resolved(self, environ: Mapping[str, str]) -> EventLogSettings:
        """These settings with the environment's override (RECFLOW_REDIS_URL) applied."""
        return dataclasses.replace(self, redis_url=environ.get("RECFLOW_REDIS_URL") or self.redis_url)


@dataclass(frozen=True)
class RegistrySettings:
    """The model registry (recflow.ops.registry): versions in the BentoML model store and the promotion gate."""

    home: Path = Path(".bentoml")  # BentoML home (model store, bentos), relative to the project folder
    model_name: str = "recflow"  # BentoML model name of the deployable versions
    tolerance: float = 0.005  # promote when candidate NDCG@k >= production's - tolerance, on the same test window

    def __post_init__(self) -> None:
        if self.tolerance < 0:
            raise ConfigError(f"registry.tolerance must not be negative, got {self.tolerance}")
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", self.model_name):  # a BentoML tag name (lower case)
            raise ConfigError(
                f"registry.model_name must be lower case a-z, 0-9, '-', '_' or '.', got {self.model_name!r}"
            )


DRIFT_METHODS = ("jensenshannon", "wasserstein", "psi", "hellinger", "kl_div", "ks", "chisquare", "z", "mannw")


@dataclass(frozen=True)
class DriftCheck:
    """How Evidently compares one data set of the drift check (recflow.ops.drift). Methods are Evidently stat-test
    names; distance methods flag a column when score >= threshold, p-value methods (ks, chisquare, z, mannw)
    when p < threshold. A data set drifts when the share of its drifted columns reaches `drift_share`."""

    num_method: str = "wasserstein"
    num_threshold: float = 0.1
    cat_method: str = "jensenshannon"
    cat_threshold: float = 0.1
    drift_share: float = 0.5
    per_column_threshold: dict[str, float] = field(default_factory=dict)  # column -> threshold (overrides)

    def __post_init__(self) -> None:
        for name in ("num_method", "cat_method"):
            if getattr(self, name) not in DRIFT_METHODS:
                known = ", ".join(DRIFT_METHODS)
                raise ConfigError(f"drift.*.{name} must be one of {known}, got {getattr(self, name)!r}")
        if not 0.0 < self.drift_share <= 1.0:
            raise ConfigError(f"drift.*.drift_share must be in (0, 1], got {self.drift_share}")


@dataclass(frozen=True)
class DriftSettings:
    """The drift check (recflow.ops.drift): a reference window, the current window after it, and what is compared."""

    current_days: float = 7.0  # the current window: the last days of the store
    reference_days: float = 7.0  # the reference window: the days before the current one
    lookback_days: float = 14.0  # history before each window: new items/users, popularity buckets, ranker context
    popularity_buckets: int = 10  # items bucketed by their share of the lookback's events
    min_events: int = 1000  # fewer events in either window: no verdict (EmptyDataError)
    max_rows: int = 50_000  # rows per window handed to Evidently; a seeded random sample above it
    candidate_users: int = 500  # active users per window whose candidates the ranker scores
    seed: int = 0
    keep_reports: int = 48  # report pairs kept in reports/drift (older ones are removed)
    events: DriftCheck = field(  # one row per event
        default_factory=lambda: DriftCheck(
            drift_share=0.25,
            per_column_threshold={"action": 0.05, "item_popularity": 0.17, "new_item": 0.2, "new_user": 0.1},
        )
    )
    users: DriftCheck = field(default_factory=lambda: DriftCheck(num_threshold=0.15))  # one row per active user
    candidates: DriftCheck = field(default_factory=lambda: DriftCheck(num_threshold=0.15))  # (user, candidate) rows

    def __post_init__(self) -> None:
        for name in ("current_days", "reference_days", "lookback_days"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"drift.{name} must be positive, got {getattr(self, name)}")
        for name in ("popularity_buckets", "min_events", "max_rows", "candidate_users", "keep_reports"):
            if getattr(self, name) < 1:
                raise ConfigError(f"drift.{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Settings:
    paths: Paths = field(default_factory=Paths)
    events: EventSettings = field(default_factory=EventSettings)
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    features: FeatureSettings = field(default_factory=FeatureSettings)
    als: ALSSettings = field(default_factory=ALSSettings)
    candidates: CandidateSettings = field(default_factory=CandidateSettings)
    ranker: RankerSettings = field(default_factory=RankerSettings)
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)
    eventlog: EventLogSettings = field(default_factory=EventLogSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    drift: DriftSettings = field(default_factory=DriftSettings)

    def replace(self, section: str, **changes: Any) -> Settings:
        """A copy with some fields of one section changed: `settings.replace("als", alpha=5.0)`."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


T = TypeVar("T")


def _build(cls: type[T], raw: Any, where: str) -> T:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; known: {', '.join(sorted(names))}")
    values = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in raw.items()}
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union) and type(None) in typing.get_args(hint):  # `X | None`: null allowed
        if value is None:
            return None
        (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return _coerce(inner, value, where)
    try:
        if hint is Path:
            return Path(value)
        if hint is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if hint in (int, float, str):
            if isinstance(value, bool) or (hint is not str and not isinstance(value, int | float)):
                raise TypeError
            if hint is int and float(value) != int(value):
                raise TypeError
            return hint(value)
        if origin is tuple:
            (inner, _) = typing.get_args(hint)
            return tuple(_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
        if origin is dict:
            key_type, value_type = typing.get_args(hint)
            return {_coerce(key_type, k, where): _coerce(value_type, v, f"{where}.{k}") for k, v in value.items()}
    except (TypeError, ValueError, AttributeError):
        raise ConfigError(f"{where} must be {getattr(hint, '__name__', hint)}, got {value!r}") from None
    raise ConfigError(f"{where}: unsupported setting type {hint}")


def load_settings(path: Path | str = DEFAULT_PARAMS) -> Settings:
    """Read params.yaml into Settings. A missing file gives the built-in defaults (same as the shipped file)."""
    path = Path(path)
    if not path.exists():
        if path == DEFAULT_PARAMS:
            return Settings()
        raise ConfigError(f"parameter file {path} does not exist; pass --params PATH or create it")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    settings = _build(Settings, raw, path.name)
    _check(settings, path)
    return settings


def _check(settings: Settings, path: Path) -> None:
    split = settings.features.split
    if split.method not in SPLIT_METHODS:
        raise ConfigError(
            f"{path}: features.split.method must be one of {', '.join(SPLIT_METHODS)}, got {split.method!r}"
        )
    for name in ("test_fraction", "validation_fraction"):
        value = getattr(split, name)
        if not 0.0 < value < 1.0:
            raise ConfigError(f"{path}: features.split.{name} must be between 0 and 1, got {value}")
    if not settings.events.actions:
        raise ConfigError(f"{path}: events.actions must name at least one action with its weight")
    if any(w <= 0 for w in settings.events.actions.values()):
        raise ConfigError(f"{path}: events.actions weights must be positive")
    unknown = sorted(set(settings.als.tune.search) - {"alpha", "regularization", "factors"})
    if unknown:
        raise ConfigError(f"{path}: als.tune.search may name alpha, regularization, factors; not {', '.join(unknown)}")
    half_life = settings.features.half_life_days
    if half_life is not None and half_life < 0:
        raise ConfigError(f"{path}: features.half_life_days must be 0 (no decay), positive, or null (chosen)")
    unknown_models = sorted(set(settings.selection.models) - set(MODEL_KINDS))
    if unknown_models or not settings.selection.models:
        raise ConfigError(
            f"{path}: selection.models must name some of {', '.join(MODEL_KINDS)}; not {', '.join(unknown_models)}"
        )
    if not 0.0 < settings.selection.select_share < 1.0:
        raise ConfigError(f"{path}: selection.select_share must be between 0 and 1")
