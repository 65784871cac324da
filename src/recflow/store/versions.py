"""Data versions: a digest of what the event store holds, digests of parameters, and `dvc add` of the data folder.

The store is append-only and its files are named by the digest of their batch (see store.py), so the sorted
list of its files with their sizes identifies its content; reading it costs a directory walk, not the data.
`data.dvc` (written by `dvc add data`) versions the whole data folder, inbox and rejects included.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from recflow.config import Settings
from recflow.errors import DataVersionError

logger = logging.getLogger(__name__)


def store_version(store: Path) -> str:
    """A short digest of the store's data files (names and sizes); "empty" when it holds none."""
    files = sorted(p for p in Path(store).glob("date=*/part-*.parquet") if p.is_file())
    if not files:
        return "empty"
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(store).as_posix()}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def params_digest(settings: Settings, sections: tuple[str, ...]) -> str:
    """A short digest of some sections of the settings (what a stage reads, as its dvc.yaml `params`)."""
    payload = {name: dataclasses.asdict(getattr(settings, name)) for name in sections}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_digest(modules: tuple[str, ...]) -> str:
    """A short digest of the source of some recflow modules (what a stage runs, as its dvc.yaml code deps)."""
    digest = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"no module {name}")
        digest.update(Path(spec.origin).read_bytes())
    return digest.hexdigest()[:16]


def dvc_enabled(root: Path) -> bool:
    return (Path(root) / ".dvc").is_dir()


def dvc_add(root: Path, target: Path) -> str:
    """`dvc add <target>` in the DVC project at `root`; returns the md5 recorded in `<target>.dvc`. Adding an
    unchanged folder is a no-op that returns the same md5."""
    dvc = shutil.which("dvc") or shutil.which("dvc", path=str(Path(sys.executable).parent))  # venv not activated
    if dvc is None:
        raise DataVersionError("the dvc command is not on PATH: install recflow's dependencies (pip install -e .)")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(
        [dvc, "add", "--quiet", str(target)], cwd=root, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise DataVersionError(f"dvc add {target} failed: {message[-1] if message else done.returncode}")
    record = yaml.safe_load((Path(root) / f"{target}.dvc").read_text())
    return str(record["outs"][0]["md5"])
