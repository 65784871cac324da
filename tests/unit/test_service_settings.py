"""The `service:` section of params.yaml: environment overrides and the checks that say what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from recflow.config import EventLogSettings, ServiceSettings, load_settings
from recflow.errors import ConfigError


def test_the_environment_overrides_the_token_and_the_redis_url() -> None:
    settings = ServiceSettings(token="from-params")
    assert settings.resolved({}).token == "from-params"
    resolved = settings.resolved({"RECFLOW_SERVICE_TOKEN": "from-env", "RECFLOW_SERVICE_REDIS_URL": "redis://r:1/0"})
    assert resolved.token == "from-env" and resolved.redis_url == "redis://r:1/0"


def test_null_means_no_token_and_no_redis(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("service: {token: null, redis_url: null, k_max: 50}\n")
    service = load_settings(tmp_path / "params.yaml").service
    assert service.token is None and service.redis_url is None and service.k_max == 50


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("service: {k_max: 500}", "service.k_max must be between 1 and 200"),
        ("service: {max_body_bytes: 0}", "service.max_body_bytes must be at least 1"),
        ("service: {reload_check_seconds: -1}", "service.reload_check_seconds must not be negative"),
        ("service: {max_events: 0}", "service.max_events must be at least 1"),
        ("service: {workers: 0}", "service.workers must be at least 1"),
    ],
)
def test_bad_service_settings_say_what_to_fix(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "params.yaml").write_text(text + "\n")
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_settings(tmp_path / "params.yaml")


def test_more_than_one_worker_needs_the_user_state_in_redis() -> None:
    settings = ServiceSettings(workers=2)
    with pytest.raises(ConfigError, match=r"service\.workers is 2, .* set service\.redis_url"):
        settings.resolved({})
    assert settings.resolved({"RECFLOW_SERVICE_REDIS_URL": "redis://r:1/0"}).workers == 2
    assert ServiceSettings(workers=2, redis_url="redis://r:1/0").resolved({}).workers == 2


def test_an_empty_variable_overrides_nothing() -> None:
    settings = ServiceSettings(token="from-params", redis_url="redis://p:1/0")
    assert settings.resolved({"RECFLOW_SERVICE_TOKEN": "", "RECFLOW_SERVICE_REDIS_URL": ""}) == settings


def test_each_section_reads_only_its_own_variables() -> None:
    """RECFLOW_REDIS_URL is the event log's Redis, RECFLOW_SERVICE_REDIS_URL the service's user state."""
    environ = {"RECFLOW_REDIS_URL": "redis://log:1/0", "RECFLOW_SERVICE_REDIS_URL": "redis://state:1/0"}
    assert ServiceSettings().resolved(environ).redis_url == "redis://state:1/0"
    assert EventLogSettings().resolved(environ).redis_url == "redis://log:1/0"
