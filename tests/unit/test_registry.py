"""The registry's settings, data version and production pointer, without a trained model."""

from __future__ import annotations

from pathlib import Path

import pytest

from recflow.config import RegistrySettings, Settings, load_settings
from recflow.errors import ConfigError, NoProductionError, RegistryError
from recflow.ops import registry


def test_the_store_defaults_inside_the_project(tmp_path: Path) -> None:
    settings = load_settings(Path(__file__).resolve().parents[2] / "params.yaml")
    assert settings.registry == RegistrySettings()
    assert registry.bentoml_home(settings, tmp_path) == tmp_path / ".bentoml"
    assert registry.production_file(settings, tmp_path) == tmp_path / ".bentoml" / "recflow" / "production.json"
    elsewhere = settings.replace("registry", home=tmp_path / "shared-store")
    assert registry.bentoml_home(elsewhere, Path("/some/project")) == tmp_path / "shared-store"


def test_registry_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="tolerance must not be negative"):
        RegistrySettings(tolerance=-0.1)
    for bad in ("my model", "RecFlow", ""):  # BentoML lower-cases tag names: refuse what would not round-trip
        with pytest.raises(ConfigError, match="model_name"):
            RegistrySettings(model_name=bad)


def test_data_version_is_the_md5_in_data_dvc(tmp_path: Path) -> None:
    assert registry.data_version(tmp_path) == "untracked"
    (tmp_path / "data.dvc").write_text("outs:\n- md5: 85fba3b1810986ec6bec7ba0e90c23f4.dir\n  path: data\n")
    assert registry.data_version(tmp_path) == "85fba3b1810986ec6bec7ba0e90c23f4.dir"
    (tmp_path / "data.dvc").write_text("outs: []\n")
    with pytest.raises(RegistryError, match="dvc add data"):
        registry.data_version(tmp_path)


def test_an_empty_store_has_no_versions_no_production_and_no_history(tmp_path: Path) -> None:
    settings = Settings()
    assert registry.versions(settings, tmp_path) == []
    assert registry.production(settings, tmp_path) is None
    assert registry.history(settings, tmp_path) == []
    with pytest.raises(NoProductionError, match="run `recflow train`, `recflow evaluate` and `recflow deploy`"):
        registry.load_production_bundle(settings, tmp_path)


def test_a_damaged_production_pointer_is_reported_not_ignored(tmp_path: Path) -> None:
    settings = Settings()
    pointer = registry.production_file(settings, tmp_path)
    pointer.parent.mkdir(parents=True)
    pointer.write_text("{not json")
    with pytest.raises(RegistryError, match="not a production pointer"):
        registry.production(settings, tmp_path)
    pointer.write_text('{"version": "20260101-000000-deadbeef", "previous": []}')
    with pytest.raises(RegistryError, match="not in the model store"):
        registry.production(settings, tmp_path)
