"""Typed settings read from params.yaml: the one source of truth for paths and parameters."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from recflow.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")


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
    method: str = "global_time"
    test_fraction: float = 0.2
    validation_fraction: float = 0.2


@dataclass(frozen=True)
class FeatureSettings:
    half_life_days: float = 30.0
    split: SplitSettings = field(default_factory=SplitSettings)


@dataclass(frozen=True)
class TuneSettings:
    enabled: bool = True
    budget_seconds: float = 60.0
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


@dataclass(frozen=True)
class RankerSettings:
    enabled: bool = True
    n_estimators: int = 300
    learning_rate: float = 0.05
    num_leaves: int = 4
    min_child_samples: int = 20
    early_stopping_rounds: int = 30
    max_train_users: int = 20_000
    windows: int = 4
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
class Settings:
    paths: Paths = field(default_factory=Paths)
    events: EventSettings = field(default_factory=EventSettings)
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    features: FeatureSettings = field(default_factory=FeatureSettings)
    als: ALSSettings = field(default_factory=ALSSettings)
    candidates: CandidateSettings = field(default_factory=CandidateSettings)
    ranker: RankerSettings = field(default_factory=RankerSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)

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
    if split.method not in ("global_time", "per_user"):
        raise ConfigError(f"{path}: features.split.method must be global_time or per_user, got {split.method!r}")
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
    if settings.features.half_life_days <= 0:
        raise ConfigError(f"{path}: features.half_life_days must be positive")
