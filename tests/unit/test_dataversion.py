"""Data versions: the store digest moves exactly when stored events change; parameter digests per section."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from recflow.config import GenerateSettings, Settings
from recflow.events.synth import generate_events
from recflow.store.eventstore import ingest_table
from recflow.store.versions import params_digest, source_digest, store_version


def test_store_version_changes_with_new_events_only(tmp_path: Path) -> None:
    store, settings = tmp_path / "events", Settings()
    assert store_version(store) == "empty"
    table = generate_events(GenerateSettings(users=20, items=10, events=300, days=3))
    kwargs = {
        "store": store,
        "rejected": tmp_path / "rejected",
        "settings": settings.events,
        "now": datetime(2100, 1, 1, tzinfo=UTC),
    }
    ingest_table(table.slice(0, 200), source="a", **kwargs)
    first = store_version(store)
    ingest_table(table.slice(0, 200), source="a again", **kwargs)  # all duplicates: nothing written
    assert store_version(store) == first != "empty"
    ingest_table(table.slice(200), source="b", **kwargs)
    assert store_version(store) != first


def test_params_digest_follows_the_named_sections_only() -> None:
    base = Settings()
    sections = ("als", "ranker")
    assert params_digest(base, sections) == params_digest(Settings(), sections)
    assert params_digest(base.replace("als", alpha=3.0), sections) != params_digest(base, sections)
    assert params_digest(base.replace("evaluate", k=5), sections) == params_digest(base, sections)


def test_source_digest_names_a_missing_module() -> None:
    assert len(source_digest(("recflow.model.training",))) == 16
    with pytest.raises(ModuleNotFoundError, match=r"recflow\.nothing"):
        source_digest(("recflow.nothing",))
