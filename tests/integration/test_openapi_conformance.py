"""The OpenAPI spec tells the truth (issue 15): schemathesis with every check, run as bentos/README.md shows (from the
repo root, so schemathesis.toml there sets the seed, the examples per operation and the 422 allowance with its own
check), against a real `bentoml serve` of a deployed small model with a bearer token.

Every check means: no 5xx, only documented statuses, bodies and content types that match their schemas, a request
the schema accepts is accepted (ST202) and one it forbids is refused (ST201), and the rest of `--checks all`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..conftest import REPO
from ..servingkit import deploy_small_project
from .test_bentoml_serve import serving, wait_until_ready

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")
TOKEN = "conformance-token"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """`bentoml serve` of a deployed small project whose write endpoints need TOKEN."""
    root = tmp_path_factory.mktemp("openapi")
    deploy_small_project(root, service={"token": TOKEN, "reload_check_seconds": 0})
    (root / "bentos").mkdir()
    for name in ("service.py", "bentofile.yaml"):
        shutil.copy2(REPO / "bentos" / name, root / "bentos" / name)
    with serving(root) as client:
        assert wait_until_ready(client).status_code == 200
        yield client


def schemathesis_run(client: httpx.Client, *options: str) -> str:
    command = [SCHEMATHESIS, "run", f"{client.base_url}/docs.json", "--checks", "all", "--no-color", *options]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    return result.stdout


def test_schemathesis_with_every_check_finds_nothing(served: httpx.Client) -> None:
    """Regression (issue 15): the 400 body's `detail` broke its schema on four operations, and a schema-valid event
    (an empty action) got an undocumented 422."""
    output = schemathesis_run(served, "--header", f"Authorization: Bearer {TOKEN}", "--workers", "1")
    assert re.search(r"Tested: 9\b", output), output  # the 4 APIs, GET /model and BentoML's 4 infrastructure routes
    generated = re.search(r"(\d+) generated, (\d+) passed", output)
    assert generated is not None and generated[1] == generated[2] and int(generated[1]) >= 300, output
    assert "No issues found" in output


def test_without_the_token_the_write_endpoints_answer_as_documented(served: httpx.Client) -> None:
    """Every case passes, and every one got 401: the caller is checked before the body (issue 11), so schemathesis
    warns that nothing but 401/403 came back, which is the point here."""
    output = schemathesis_run(served, "--include-path-regex", "^/(events|reload)$", "--max-examples", "10")
    generated = re.search(r"(\d+) generated, (\d+) passed", output)
    assert generated is not None and generated[1] == generated[2] and re.search(r"Tested: 2\b", output), output
    assert "2 operations returned only 401/403 responses" in output, output
    refused = served.post("/reload", json={})
    assert refused.status_code == 401 and "bearer token" in refused.json()["error"]
