from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path

import pytest

from recflow.config import Settings, SplitSettings, load_settings
from recflow.errors import ConfigError

from ..conftest import REPO


def test_shipped_params_match_the_built_in_defaults() -> None:
    assert load_settings(REPO / "params.yaml") == Settings()


def test_unknown_key_is_named(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("als:\n  factorz: 8\n")
    with pytest.raises(ConfigError, match=r"factorz.*als"):
        load_settings(params)


def test_wrong_type_is_named(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("als:\n  factors: many\n")
    with pytest.raises(ConfigError, match=r"als.factors must be int"):
        load_settings(params)


def test_bad_split_method(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("features:\n  split:\n    method: sometimes\n")
    with pytest.raises(ConfigError, match="auto, global_time, per_user, random"):
        load_settings(params)


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


def test_replace_changes_one_section() -> None:
    settings = Settings().replace("als", alpha=3.0)
    assert settings.als.alpha == 3.0
    assert settings.als.factors == Settings().als.factors


def test_every_unknown_key_is_named_with_the_keys_that_exist(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("als:\n  factorz: 8\n  alhpa: 1.0\nrankr: {}\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(params)
    message = str(raised.value)
    assert "unknown key als.factorz, als.alhpa; the keys of als are alpha, factors," in message
    assert "unknown key rankr; the keys of the file are als, candidates," in message


def test_a_renamed_key_says_what_replaced_it(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("selection:\n  ease_max_items: 10000\n")
    with pytest.raises(ConfigError, match=r"selection\.ease_max_items is now selection\.ease_max_gb, EASE's memory"):
        load_settings(params)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("als: {factors: '8'}", "als.factors must be int, got '8'"),  # a quoted number is a string in YAML
        ("als: {factors: 8.5}", "als.factors must be int, got 8.5"),
        ("als: {factors: true}", "als.factors must be int, got True"),
        ("ranker: {enabled: 1}", "ranker.enabled must be bool, got 1"),
        ("als: {alpha: '1.0'}", "als.alpha must be float, got '1.0'"),
        ("paths: {store: 5}", "paths.store must be a path, got 5"),
        ("als: [1, 2]", "als must be a mapping, got [1, 2]"),
        ("als: {tune: {search: [alpha, beta]}}", "als.tune.search.1 must be alpha, regularization or factors"),
        ("events: {actions: {view: 0}}", "events.actions.view must be positive, got 0"),
        ("events: {actions: {}}", "events.actions must name at least one action with its weight"),
        ("features: {half_life_days: -1}", "features.half_life_days must not be negative, got -1"),
        ("selection: {models: [als, magic]}", "selection.models.1 must be"),
        ("features: {split: {test_fraction: 1.0}}", "features.split.test_fraction must be less than 1, got 1.0"),
        ("drift: {users: {min_effect: -1}}", "drift.users.min_effect must not be negative, got -1"),
        ("drift: {alpha: 0}", "drift.alpha must be"),
        ("eventlog: {stream: null}", "eventlog.stream must be str, got None"),
        ("ranker: {num_leaves: []}", "ranker.num_leaves must name at least one"),
        ("ranker: {num_leaves: [4, 1]}", "ranker.num_leaves.1 must be at least 2, got 1"),
    ],
)
def test_a_wrong_value_names_its_key_and_what_it_must_be(tmp_path: Path, text: str, message: str) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(text + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"{params}: {message}")):
        load_settings(params)


def test_values_are_read_as_the_settings_type_them(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        "als: {factors: 8.0}\nranker: {popularity_windows_days: [1, 7], num_leaves: 8}\nservice: {token: 12345}\n"
    )
    settings = load_settings(params)
    assert settings.ranker.num_leaves == (8,)  # one number: that one, no choice
    assert settings.als.factors == 8 and isinstance(settings.als.factors, int)
    assert settings.ranker.popularity_windows_days == (1.0, 7.0)  # a tuple, as the defaults
    assert settings.service.token == "12345"  # YAML reads an unquoted number; a token is a string
    assert isinstance(settings.paths.store, Path)


def test_an_empty_section_means_its_defaults(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("service:\n  # token: secret\nals:\n")
    assert load_settings(params) == Settings()


def test_a_validation_window_is_required_in_params_but_code_may_cut_without_one(tmp_path: Path) -> None:
    """selection.make_folds cuts a test-only window (validation_fraction 0); params.yaml needs a validation
    window for the ranker's labels and the tuning's targets."""
    params = tmp_path / "params.yaml"
    params.write_text("features: {split: {validation_fraction: 0}}\n")
    with pytest.raises(ConfigError, match=r"features\.split\.validation_fraction must be between 0 and 1"):
        load_settings(params)
    assert SplitSettings(method="per_user", test_fraction=0.3, validation_fraction=0.0).validation_fraction == 0.0


def test_settings_built_in_code_are_checked_like_the_file() -> None:
    with pytest.raises(ConfigError, match=r"^als\.factors must be int, got 'many'$"):
        Settings().replace("als", factors="many")
    with pytest.raises(ConfigError, match=r"^unknown key als\.factorz"):
        Settings().replace("als", factorz=8)


def test_settings_are_frozen_dataclasses() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.als.factors = 8  # type: ignore[misc]
    assert dataclasses.asdict(settings)["als"]["tune"]["search"] == ("alpha", "regularization", "factors")
    assert pickle.loads(pickle.dumps(settings)) == settings
