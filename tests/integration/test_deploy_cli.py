"""Deploy, versions and rollback through the real `recflow` command, as a user runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recflow.model.evaluate import evaluate

from ..conftest import write_small_project
from ..servingkit import train_small_project

RECFLOW = str(Path(sys.executable).parent / "recflow")
ENV = {**os.environ, "COLUMNS": "200"}  # wide tables: every version and reason on one line


def run(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([RECFLOW, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV)
    if ok:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained and evaluated project (built in-process: the commands under test are the registry's), its data
    tracked by a real `dvc add data`, and worse.yaml: the same project with a clearly worse model."""
    root = tmp_path_factory.mktemp("deploy")
    settings, _ = train_small_project(root)
    settings = settings.replace("paths", reports=root / "reports")
    evaluate(settings.paths.features, settings.paths.models, settings.paths.reports, settings)
    worse = yaml.safe_load((root / "params.yaml").read_text())
    worse["ranker"]["enabled"] = False
    worse["als"]["factors"] = 1
    (root / "worse.yaml").write_text(yaml.safe_dump(worse, sort_keys=False))
    dvc = str(Path(sys.executable).parent / "dvc")
    for args in (("init", "-q", "--no-scm"), ("config", "core.analytics", "false"), ("add", "-q", "data")):
        subprocess.run([dvc, *args], cwd=root, check=True, capture_output=True, timeout=300, env=ENV)
    return root


def production_marker(versions_output: str) -> list[str]:
    return [line for line in versions_output.splitlines() if re.search(r"│ \* │", line)]


def test_deploy_versions_and_rollback(project: Path) -> None:
    result = run(project, "rollback", ok=False)
    assert result.returncode == 2 and "nothing to roll back" in result.stderr and "Traceback" not in result.stderr

    first = run(project, "deploy", "--user", "alice")
    assert "promoted: first deployment" in first.stdout
    good = re.search(r"production: (\S+)", first.stdout).group(1)

    run(project, "train", "--params", "worse.yaml")
    run(project, "evaluate", "--params", "worse.yaml")
    refused = run(project, "deploy", "--params", "worse.yaml", "--user", "bob")
    said = " ".join(refused.stdout.split())  # rich wraps long reasons at the terminal's width
    assert "not promoted: refused: ndcg@10" in said
    assert f"production stays {good}" in said and f"production: {good}" in said

    listed = run(project, "versions", "--history")
    data_version = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    assert listed.stdout.count(f"│ {data_version[:8]} ") == 2  # both versions trained on the data of data.dvc
    assert len(re.findall(r"│ [ *] │ \d{8}-\d{6}-[0-9a-f]{8} ", listed.stdout)) == 2
    assert [good in line for line in production_marker(listed.stdout)] == [True]
    history = [line for line in listed.stdout.splitlines() if "alice" in line or "bob" in line]
    assert "promote" in history[0] and "refuse" in history[1] and "refused: ndcg@10" in history[1]

    result = run(project, "rollback", ok=False)
    assert result.returncode == 2 and f"{good} is the only version" in result.stderr

    forced = run(project, "deploy", "--params", "worse.yaml", "--force")
    assert "promoted: forced past the gate (--force)" in forced.stdout
    worse_version = re.search(r"production: (\S+)", forced.stdout).group(1)
    assert worse_version != good

    rolled = run(project, "rollback", "--user", "carol")
    seconds = float(re.search(r"in ([\d.]+) s", rolled.stdout).group(1))
    print(f"recflow rollback: {seconds:.2f} s (inside the command)")
    assert f"rolled back from {worse_version} to {good}" in rolled.stdout and seconds < 5.0
    assert [good in line for line in production_marker(run(project, "versions").stdout)] == [True]
    pointer = json.loads((project / ".bentoml/recflow/production.json").read_text())
    assert pointer["version"] == good

    strict = run(project, "deploy", "--params", "worse.yaml", "--fail-on-refusal", ok=False)
    assert strict.returncode == 1 and "not promoted: refused" in strict.stdout


def test_deploy_without_a_trained_model_says_what_to_run(tmp_path: Path) -> None:
    write_small_project(tmp_path)
    result = run(tmp_path, "deploy", ok=False)
    assert result.returncode == 2 and "recflow train" in result.stderr and "Traceback" not in result.stderr
    assert "no versions" in run(tmp_path, "versions").stdout
