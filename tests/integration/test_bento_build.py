"""`bentoml build` of bentos/ works offline and produces a versioned bento of the service."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from ..conftest import REPO

BENTOML = str(Path(sys.executable).parent / "bentoml")


def test_bentoml_build_offline_makes_a_versioned_bento(tmp_path: Path) -> None:
    home = tmp_path / "bentoml-home"
    dead = "http://127.0.0.1:9"  # nothing listens there: any attempt to reach PyPI fails
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "True",
        "HTTP_PROXY": dead,
        "HTTPS_PROXY": dead,
        "UV_OFFLINE": "1",
        "PIP_NO_INDEX": "1",
    }
    built = subprocess.run(
        [BENTOML, "build", "-o", "tag"], cwd=REPO / "bentos", env=env, capture_output=True, text=True, timeout=300
    )
    assert built.returncode == 0, built.stdout + built.stderr
    tag = re.search(r"__tag__:(\S+)", built.stdout).group(1)
    name, version = tag.split(":")
    assert name == "recflow" and re.fullmatch(r"[a-z0-9]+", version)

    bento = home / "bentos" / name / version
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["service"] == "service:Recommender" and info["version"] == version
    assert (bento / "src" / "service.py").exists()
    openapi = (bento / "apis" / "openapi.yaml").read_text()
    for route in ("/recommend", "/events", "/similar", "/model"):
        assert f"  {route}:" in openapi

    # a second build is a second version; `bentoml list` knows both
    again = subprocess.run(
        [BENTOML, "build", "-o", "tag"], cwd=REPO / "bentos", env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stdout + again.stderr
    listed = subprocess.run([BENTOML, "list"], env=env, capture_output=True, text=True, timeout=120, check=True)
    assert tag in listed.stdout and re.search(r"__tag__:(\S+)", again.stdout).group(1) in listed.stdout
