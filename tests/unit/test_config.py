from __future__ import annotations

from pathlib import Path

import pytest

from recflow.config import Settings, load_settings
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
    params.write_text("features:\n  split:\n    method: random\n")
    with pytest.raises(ConfigError, match="global_time or per_user"):
        load_settings(params)


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


def test_replace_changes_one_section() -> None:
    settings = Settings().replace("als", alpha=3.0)
    assert settings.als.alpha == 3.0
    assert settings.als.factors == Settings().als.factors
