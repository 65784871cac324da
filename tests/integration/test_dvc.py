"""`dvc repro` in a temporary git repository: runs everything, then nothing, then only what a change touches."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from ..conftest import REPO, write_small_project

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def sh(cwd: Path, *args: str) -> str:
    result = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def ran(output: str) -> set[str]:
    return {stage for stage in ("features", "train", "evaluate") if f"Running stage '{stage}'" in output}


def make_repo(root: Path) -> None:
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    write_small_project(root, als={"tune": {"enabled": False}}, generate={"events": 20_000})
    (root / ".gitignore").write_text("/features\n/models\n/reports\n")
    sh(root, "git", "init", "-q")
    sh(root, "git", "config", "user.email", "test@example.com")
    sh(root, "git", "config", "user.name", "test")
    sh(root, "dvc", "init", "-q")
    sh(root, "dvc", "config", "core.analytics", "false")
    sh(root, "dvc", "config", "core.check_update", "false")


def data_step(root: Path) -> None:
    sh(root, "recflow", "generate")
    sh(root, "recflow", "ingest")
    sh(root, "dvc", "add", "-q", "data")


def test_repro_runs_all_then_nothing_then_only_the_changed_stage(tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    make_repo(root)
    data_step(root)
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "data")

    assert ran(sh(root, "dvc", "repro")) == {"features", "train", "evaluate"}
    assert (root / "models/metrics.json").exists() and (root / "dvc.lock").exists()

    second = sh(root, "dvc", "repro")
    assert ran(second) == set() and "up to date" in second

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ranker"]["learning_rate"] = 0.1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = sh(root, "dvc", "status")
    assert "train" in status and "features:" not in status
    assert ran(sh(root, "dvc", "repro")) == {"train", "evaluate"}

    metrics = sh(root, "dvc", "metrics", "show")
    assert "served.ndcg@10" in metrics


def test_fresh_clone_reproduces_after_the_data_step_offline(tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    make_repo(origin)
    data_step(origin)
    sh(origin, "git", "add", "-A")
    sh(origin, "git", "commit", "-qm", "data")

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(origin), str(clone))
    assert not (clone / "data").exists()  # the data itself is not in git
    data_step(clone)
    assert sh(clone, "git", "status", "--porcelain").strip() == "", "the same data step gives the same data"
    assert ran(sh(clone, "dvc", "repro")) == {"features", "train", "evaluate"}
