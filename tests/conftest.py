"""Shared fixtures. OPENBLAS_NUM_THREADS must be set before numpy is first imported (see STACK_NOTES)."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MOVIELENS = REPO.parent / "shared" / "data" / "ml-100k"


@pytest.fixture
def movielens_dir() -> Path:
    if not (MOVIELENS / "u.data").exists():
        pytest.skip(f"MovieLens 100K not found at {MOVIELENS} (it is never part of the repo)")
    return MOVIELENS
