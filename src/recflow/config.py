"""Typed settings read from params.yaml: the one source of truth for paths and parameters.

Each section of params.yaml is a frozen pydantic dataclass (so `dataclasses.replace` and `asdict` work on it). The
field types and constraints are the validation; `_explain` turns pydantic's errors into ConfigErrors that name the
params.yaml key and say what it must be. Scalars are strict as YAML gives them: an int setting takes 8 or 8.0 but
not "8" or true, a bool takes only true/false. A few settings may be overridden by `RECFLOW_*` environment
variables: the field declares its variable (`Env`), and the section's `resolved(environ)` applies them.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, dataclass_transform

import pydantic
import yaml
from pydantic import BeforeValidator, ConfigDict, Field, Strict, ValidationError, ValidationInfo
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from recflow.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")
SPLIT_METHODS = ("auto", "global_time", "per_user", "random")
ModelKind = Literal["popularity", "item_knn", "ease", "als", "als_ranker"]
MODEL_KINDS: tuple[ModelKind, ...] = ("popularity", "item_knn", "ease", "als", "als_ranker")
KnnWeighting = Literal["bm25", "cosine", "count"]

T = TypeVar("T")


def _whole_number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# YAML scalars as the settings take them (pydantic's lax mode would also take "8" for an int and "yes" for a bool).
Int = Annotated[int, BeforeValidator(_whole_number), Strict()]  # 8 or 8.0; not "8", 8.5 or true
Float = Annotated[float, Strict()]  # 0.5 or 1; not "0.5" or true
Bool = Annotated[bool, Strict()]  # true or false only
Count = Annotated[Int, Field(ge=1)]  # at least 1
NonNegativeInt = Annotated[Int, Field(ge=0)]
NonNegative = Annotated[Float, Field(ge=0)]
Positive = Annotated[Float, Field(gt=0)]
# str settings are lax with numbers (`token: 12345` is the string "12345"), see _CONFIG; Path settings take strings.

_CONFIG = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
_PARAMS_FILE = "params_file"  # validation context key: set while reading params.yaml (rules only the file must meet)


@dataclasses.dataclass(frozen=True)
class Env:
    """Field marker: the environment variable that overrides this setting, applied by the section's `resolved`.
    An unset or empty variable leaves the setting as it is."""

    variable: str


class _Section:
    __pydantic_fields__: ClassVar[dict[str, FieldInfo]]  # set by pydantic on each section

    @pydantic.model_validator(mode="before")
    @classmethod
    def _empty_is_default(cls, data: Any) -> Any:
        return {} if data is None else data  # `service:` with every key commented out: the defaults


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, Field))
def _settings(key: str) -> Callable[[type[T]], type[T]]:
    """Make a class a settings section: a frozen pydantic dataclass whose invalid values, when it is built in code
    (`ServiceSettings(k_max=0)`, `settings.replace(...)`), raise a ConfigError naming `key` (its params.yaml key)."""

    def make(cls: type[T]) -> type[T]:
        section = pydantic.dataclasses.dataclass(frozen=True, config=_CONFIG)(cls)
        validate = section.__init__

        @functools.wraps(validate)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                validate(self, *args, **kwargs)
            except ValidationError as exc:
                raise ConfigError(_explain(exc, section, key)) from None

        section.__init__ = __init__  # type: ignore[method-assign]
        return section  # type: ignore[return-value]  # the same class, now a pydantic dataclass

    return make


@_settings("paths")
class Paths(_Section):
    inbox: Path = Path("data/inbox")
    store: Path = Path("data/events")
    rejected: Path = Path("data/rejected")
    features: Path = Path("features")
    models: Path = Path("models")
    reports: Path = Path("reports")


@_settings("events")
class EventSettings(_Section):
    actions: dict[str, Positive] = field(
        default_factory=lambda: {"view": 0.5, "click": 1.0, "add_to_cart": 1.5, "purchase": 2.0}
    )
    max_future_skew_seconds: Float = 300.0
    max_id_length: Int = 256

    @pydantic.field_validator("actions")
    @classmethod
    def _at_least_one_action(cls, actions: dict[str, float]) -> dict[str, float]:
        if not actions:
            raise ValueError("must name at least one action with its weight")
        return actions


@_settings("generate")
class GenerateSettings(_Section):
    seed: Int = 42
    users: Int = 5000
    items: Int = 2000
    events: Int = 300_000
    days: Int = 60
    groups: Int = 12


@_settings("features.split")
class SplitSettings(_Section):
    method: str = "auto"  # auto | global_time | per_user | random (auto: per_user, or random when time says nothing)
    test_fraction: Annotated[Float, Field(gt=0, lt=1)] = 0.2
    # 0 (no validation window) is for folds the code cuts (selection.make_folds); params.yaml needs one
    validation_fraction: Annotated[Float, Field(ge=0, lt=1)] = 0.2
    seed: Int = 0  # the random split's seed

    @pydantic.field_validator("method")
    @classmethod
    def _a_split_method(cls, method: str) -> str:
        if method not in SPLIT_METHODS:
            raise ValueError(f"must be one of {', '.join(SPLIT_METHODS)}")
        return method

    @pydantic.field_validator("validation_fraction")
    @classmethod
    def _a_validation_window_in_params(cls, value: float, info: ValidationInfo) -> float:
        if value == 0 and info.context and _PARAMS_FILE in info.context:
            raise ValueError("must be between 0 and 1 (the ranker's labels and the tuning's targets come from it)")
        return value


@_settings("features")
class FeatureSettings(_Section):
    # pinned decay, measured back from each user's last event (0: none); null: chosen on validation
    half_life_days: NonNegative | None = None
    split: SplitSettings = field(default_factory=SplitSettings)


@_settings("als.tune")
class TuneSettings(_Section):
    enabled: Bool = True
    budget_seconds: Float | None = None  # wall-clock cap; null: trials only (dvc repro chooses the same anywhere)
    max_trials: Int = 16
    max_users: Int = 5000
    search: tuple[Literal["alpha", "regularization", "factors"], ...] = ("alpha", "regularization", "factors")


@_settings("als")
class ALSSettings(_Section):
    factors: Int = 64
    regularization: Float = 0.05
    alpha: Float = 10.0
    iterations: Int = 15
    refit_iterations: Int = 5
    random_state: Int = 7
    tune: TuneSettings = field(default_factory=TuneSettings)


@_settings("candidates")
class CandidateSettings(_Section):
    n: Int = 100
    popular: Int = 20
    item_item: NonNegativeInt = 50  # plus the top items of the item-to-item model (EASE or item-kNN)


@_settings("selection")
class SelectionSettings(_Section):
    """What the train stage chooses on validation folds inside the training data (recflow/model/selection.py)."""

    models: tuple[ModelKind, ...] = MODEL_KINDS
    half_lives_days: tuple[NonNegative, ...] = (0.0, 30.0, 180.0)  # decay candidates; 0: no decay
    popularity_windows_days: tuple[NonNegative, ...] = (0.0, 1.0, 7.0, 30.0)  # 0: all time
    ease_lambdas: tuple[Positive, ...] = (10.0, 50.0, 200.0, 1000.0)
    # EASE's dense items x items float32 matrices (one per validation fold, plus one being made) must fit in this
    # many GB (1 GB: 15.8k items for one matrix); a larger catalogue skips EASE
    ease_max_gb: NonNegative = 3.0
    knn_neighbours: Count = 100
    knn_weightings: tuple[KnnWeighting, ...] = ("bm25", "cosine", "count")  # item-kNN's co-occurrence weighting
    min_users: Count = 50  # tuning and selecting users per protocol below which its folds are not used (warning)
    max_users: Count = 5000  # judged users per fold (a fixed random sample above it)
    sample_users: NonNegativeInt = 100_000  # users whose events the choices are made on (0: all users)
    global_folds: Count = 4  # most global-time cuts, each earlier, while they judge fewer than max_users users
    select_share: Annotated[Float, Field(gt=0, lt=1)] = 0.4  # users held out to choose the served kind
    # the served candidate sizes: each source's `candidates` size times each of these, chosen on the tuning users the
    # ranker's trees were not grown on (one source at a time; a size replaces the one so far only when clearly ahead)
    candidate_scales: tuple[Positive, ...] = (0.5, 1.0, 2.0)
    bootstrap: Count = 1000  # resamples for the 95% intervals
    seed: Int = 0

    @pydantic.field_validator("models", "half_lives_days", "popularity_windows_days", "knn_weightings")
    @classmethod
    def _not_empty(cls, values: tuple[Any, ...]) -> tuple[Any, ...]:
        if not values:
            raise ValueError("must name at least one")
        return values


@_settings("ranker")
class RankerSettings(_Section):
    enabled: Bool = True
    n_estimators: Int = 300
    learning_rate: Float = 0.05
    # leaves per tree: the first, or another when it scores higher on validation (a number: that one)
    num_leaves: tuple[Annotated[Int, Field(ge=2)], ...] = (4, 16)
    min_child_samples: Int = 20
    early_stopping_rounds: Int = 30
    max_train_users: Int = 20_000
    popularity_windows_days: tuple[Float, ...] = (1.0, 7.0, 30.0)
    recent_items: Int = 5

    @pydantic.field_validator("num_leaves", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return (value,)
        if isinstance(value, list | tuple) and not value:
            raise ValueError("must name at least one")
        return value


@_settings("evaluate")
class EvaluateSettings(_Section):
    k: Int = 10
    recall_k: Int = 20
    curve_ks: tuple[Int, ...] = (1, 5, 10, 20, 50, 100)
    max_users: Int = 20_000
    seed: Int = 0


@_settings("service")
class ServiceSettings(_Section):
    """The HTTP service (bentos/service.py). `token` and `redis_url` may be overridden by the environment
    variables RECFLOW_SERVICE_TOKEN and RECFLOW_SERVICE_REDIS_URL (see `resolved`)."""

    # bearer token required by the write endpoints (/events, /reload); null: see protected_mode
    token: Annotated[str | None, Env("RECFLOW_SERVICE_TOKEN")] = None
    # without a token, write only from loopback clients (others get 401); false: anyone who reaches the service writes
    protected_mode: Bool = True
    max_body_bytes: Count = 1_048_576  # larger request bodies are refused with 413
    max_events: Count = 1000  # events per POST /events (and recent_events per /recommend)
    k_max: Int = 200  # the largest k a request may ask for
    # user state in Redis (shared by workers and replicas); null: state_path
    redis_url: Annotated[str | None, Env("RECFLOW_SERVICE_REDIS_URL")] = None
    redis_prefix: str = "recflow:state:"  # key prefix of the user state in Redis
    state_path: Path = Path("models/serving/user_state.jsonl")  # append-only log of user state without Redis
    reload_check_seconds: NonNegative = 5.0  # how often a request may check whether production changed (0: never)
    # how often popularity and the ranker's item statistics may be brought up to the events received since the model
    # (every worker's), on a thread a request starts; 0: never, they stay those of the training data
    item_stats_seconds: NonNegative = 1.0
    workers: Count = 1  # service processes; more than one needs redis_url (the local state log serves one process)

    @pydantic.field_validator("k_max")
    @classmethod
    def _within_the_api_limit(cls, k_max: int) -> int:
        if not 1 <= k_max <= 200:
            raise ValueError("must be between 1 and 200 (the API's limit)")
        return k_max

    def resolved(self, environ: Mapping[str, str]) -> ServiceSettings:
        """These settings with the environment's overrides applied; more than one worker needs Redis."""
        resolved = _with_environment(self, environ)
        if resolved.workers > 1 and not resolved.redis_url:
            raise ConfigError(
                f"service.workers is {resolved.workers}, which needs the user state in Redis: set service.redis_url "
                "(or RECFLOW_SERVICE_REDIS_URL); the local user-state log (service.state_path) serves one process"
            )
        return resolved


@_settings("eventlog")
class EventLogSettings(_Section):
    """The real-time event log (recflow.stream.log) and its consumer (recflow.stream.consumer). The environment
    variable RECFLOW_REDIS_URL overrides `redis_url` (see `resolved`)."""

    # null: the local spool file (embedded, single machine)
    redis_url: Annotated[str | None, Env("RECFLOW_REDIS_URL")] = None
    stream: str = "recflow:events"  # Redis stream the events are appended to
    group: str = "recflow-store"  # consumer group that stores them
    consumer: str | None = None  # consumer name; null: the host name (a restart takes back its own pending entries)
    maxlen: Count = 1_000_000  # length cap: acknowledged entries beyond it are trimmed (never unacknowledged ones)
    batch_size: Count = 10_000  # entries read and stored per batch (one store write each)
    block_ms: NonNegativeInt = 1000  # how long one read waits for new entries
    linger_ms: NonNegativeInt = (
        200  # after the first new entry, wait up to this long to fill a batch (fewer store files)
    )
    claim_idle_ms: NonNegativeInt = (
        60_000  # pending entries of another consumer idle this long are claimed (dead consumer)
    )
    max_deliveries: Count = 5  # delivered this often: stored one by one; the one a consumer dies on is dead-lettered
    dead_letter_stream: str = "recflow:events:dead"  # poison entries with their reason
    spool: Path = Path("spool")  # folder of the spool file and its consumer position (outside data/)

    @pydantic.field_validator("dead_letter_stream")
    @classmethod
    def _not_the_stream(cls, dead_letter_stream: str, info: ValidationInfo) -> str:
        if dead_letter_stream == info.data.get("stream"):
            raise ValueError("must differ from eventlog.stream")
        return dead_letter_stream

    def resolved(self, environ: Mapping[str, str]) -> EventLogSettings:
        """These settings with the environment's override (RECFLOW_REDIS_URL) applied."""
        return _with_environment(self, environ)


@_settings("registry")
class RegistrySettings(_Section):
    """The model registry (recflow.ops.registry): versions in the BentoML model store and the promotion gate."""

    home: Path = Path(".bentoml")  # BentoML home (model store, bentos), relative to the project folder
    model_name: str = "recflow"  # BentoML model name of the deployable versions
    # promote unless production's NDCG@k is ahead by more than this and by more than one standard error of the
    # paired per-user difference, both scored on the same, current test window (ops/gate.py)
    tolerance: NonNegative = 0.005

    @pydantic.field_validator("model_name")
    @classmethod
    def _a_bentoml_tag_name(cls, model_name: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", model_name):  # BentoML lower-cases tag names
            raise ValueError("must be lower case a-z, 0-9, '-', '_' or '.'")
        return model_name


@_settings("drift.*")
class DriftCheck(_Section):
    """How one data set of the drift check is judged (recflow.ops.drift): a column drifts when it is significant
    against its permutation null (drift.alpha) and its distance (Jensen-Shannon for categories, Wasserstein over the
    pooled std for numbers) is at least `min_effect`, a floor that matters only for large windows."""

    min_effect: NonNegative = 0.0
    per_column_min_effect: dict[str, NonNegative] = field(default_factory=dict)  # column -> floor (overrides)


@_settings("drift")
class DriftSettings(_Section):
    """The drift check (recflow.ops.drift): a reference window, the current window after it, and what is compared."""

    current_days: Positive = 7.0  # the current window: the last days of the store
    reference_days: Positive = 7.0  # the reference window: the days before the current one
    lookback_days: Positive = 14.0  # history ending reference_days before each window (new items/users, popularity
    # buckets), and before each window's end (the ranker's context)
    popularity_buckets: Count = 10  # items bucketed by their share of the lookback's events
    min_users: Count = 30  # fewer active users in either window: the verdict is "not enough data"
    min_events: Count = 200  # fewer events in either window: the verdict is "not enough data"
    alpha: Annotated[Float, Field(gt=0, lt=0.5)] = 0.01  # the check's false-alarm rate, split over the data sets
    permutations: Annotated[Int, Field(ge=99)] = 2000  # random user splits behind each column's null distribution
    bins: Annotated[Int, Field(ge=2)] = 128  # numbers with more distinct values are binned at pooled quantiles
    max_rows: Count = 50_000  # rows per window handed to Evidently for the flagged columns' detail
    candidate_users: Count = 500  # active users per window whose candidates the ranker scores
    seed: Int = 0
    keep_reports: Count = 48  # report pairs kept in reports/drift (older ones are removed)
    events: DriftCheck = field(  # one row per event
        default_factory=lambda: DriftCheck(min_effect=0.08, per_column_min_effect={"item_popularity": 0.1})
    )
    users: DriftCheck = field(default_factory=lambda: DriftCheck(min_effect=0.1))  # one row per active user
    candidates: DriftCheck = field(default_factory=lambda: DriftCheck(min_effect=0.3))  # (user, candidate) rows


@_settings("")
class Settings(_Section):
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
    try:
        return pydantic.TypeAdapter(Settings).validate_python(raw, context={_PARAMS_FILE: path})
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_explain(exc, Settings, '')}") from None


S = TypeVar("S", ServiceSettings, EventLogSettings)


def _with_environment(section: S, environ: Mapping[str, str]) -> S:
    """`section` with the environment variables its fields declare (`Env`) applied; unset or empty ones are ignored."""
    changes: dict[str, Any] = {
        name: environ[marker.variable]
        for name, info in type(section).__pydantic_fields__.items()
        for marker in info.metadata
        if isinstance(marker, Env) and environ.get(marker.variable)
    }
    return dataclasses.replace(section, **changes) if changes else section


_EXPECTED_TYPE = {"int": "int", "float": "float", "bool": "bool", "string": "str", "path": "a path"}
_EXPECTED_TYPE |= {"tuple": "a list", "list": "a list", "dict": "a mapping", "dataclass": "a mapping"}


def _explain(exc: ValidationError, section: type, key: str) -> str:
    """pydantic's errors as sentences that name the params.yaml key (`section` is at `key`) and say what to fix."""
    sentences: list[str] = []
    unknown: dict[tuple[str, ...], list[str]] = {}  # section -> its unknown keys (one sentence per section)
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"])
        if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            unknown.setdefault(loc[:-1], []).append(_key(key, *loc))
        else:
            sentences.append(f"{_key(key, *loc) or 'the file'} {_rule(error)}, got {error['input']!r}")
    for parent, keys in unknown.items():
        owner = section
        for part in parent:
            owner = owner.__pydantic_fields__[part].annotation  # type: ignore[attr-defined]
        known = ", ".join(sorted(owner.__pydantic_fields__))  # type: ignore[attr-defined]
        sentences.append(f"unknown key {', '.join(keys)}; the keys of {_key(key, *parent) or 'the file'} are {known}")
        sentences += [f"{old} is now {RENAMED[old]}" for old in keys if old in RENAMED]
    return "; ".join(sentences)


RENAMED = {  # keys of earlier releases -> what replaced them, named when a params.yaml still has the old key
    "selection.ease_max_items": "selection.ease_max_gb, EASE's memory budget in GB (1 GB: one matrix of 15.8k items)",
}


def _key(*parts: str) -> str:
    return ".".join(part for part in parts if part)


_EXPECTED_TYPE = {"int": "int", "float": "float", "bool": "bool", "string": "str", "path": "a path"}
_EXPECTED_TYPE |= {"tuple": "a list", "list": "a list", "dict": "a mapping", "dataclass": "a mapping"}


def _rule(error: ErrorDetails) -> str:
    """What the value must be, in the words of params.yaml's comments."""
    kind, ctx = error["type"], error.get("ctx", {})
    bound = {name: f"{value:g}" for name, value in ctx.items() if name in ("ge", "gt", "le", "lt")}
    if kind == "value_error":
        return str(ctx["error"])
    if kind == "literal_error":
        return "must be " + str(ctx["expected"]).replace("'", "")
    if kind == "greater_than_equal":
        return "must not be negative" if ctx["ge"] == 0 else f"must be at least {bound['ge']}"
    if kind == "greater_than":
        return "must be positive" if ctx["gt"] == 0 else f"must be greater than {bound['gt']}"
    if kind == "less_than_equal":
        return f"must be at most {bound['le']}"
    if kind == "less_than":
        return f"must be less than {bound['lt']}"
    if kind.split("_")[0] in _EXPECTED_TYPE:
        return f"must be {_EXPECTED_TYPE[kind.split('_')[0]]}"
    return f"is invalid ({error['msg']})"  # a rule without wording here: pydantic's own
