"""The whole batch loop through the real `recflow` command, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

RECFLOW = str(Path(sys.executable).parent / "recflow")


def run(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([RECFLOW, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if ok:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ..conftest import write_small_project

    root = tmp_path_factory.mktemp("loop")
    write_small_project(root)
    result = run(root, "demo")
    assert "offline evaluation" in result.stdout
    said = " ".join(result.stdout.split())  # rich wraps lines at the terminal's width
    chosen = r"chosen: decay (half-life [\d.]+ days|none), popularity (last [\d.]+ days|all time), item-item"
    assert re.search(chosen, said)
    assert re.search(r"candidates ALS/popular/item-item \d+/\d+/\d+, ranker (4|16) leaves per tree", said)
    return root


def test_demo_writes_every_stage_output(trained: Path) -> None:
    for path in (
        "data/events",
        "features/interactions.parquet",
        "models/bundle/bundle.json",
        "models/backtest/ranker.txt",
        "models/metrics.json",
        "models/train_report.json",
        "reports/recall_at_k.csv",
    ):
        assert (trained / path).exists(), path


def test_the_served_model_beats_popularity_on_data_built_for_it(trained: Path) -> None:
    metrics = json.loads((trained / "models/metrics.json").read_text())
    assert set(metrics) >= {"served", "popularity", "item_knn", "ease", "als"}
    assert metrics["served_kind"] != "popularity"
    assert metrics["served"]["ndcg@10"] > metrics["popularity"]["ndcg@10"]
    assert metrics["served"]["recall@20"] > metrics["popularity"]["recall@20"]
    low, high = metrics["ndcg_ci95"]["served"]
    assert low <= metrics["served"]["ndcg@10"] <= high


def test_results_piped_to_a_file_are_not_cut_to_80_columns(trained: Path) -> None:
    """Rich fits non-terminal output to 80 columns and cut the evaluation table's intervals ("0.1529-0…")."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    result = subprocess.run([RECFLOW, "evaluate"], cwd=trained, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout and re.search(r"served .* \d\.\d{4}-\d\.\d{4} ", result.stdout), result.stdout


def test_second_ingest_of_the_same_events_stores_nothing(trained: Path) -> None:
    result = run(trained, "ingest", "data/inbox")
    stored = [line for line in result.stdout.splitlines() if "│" in line][-1]
    read, stored_count, duplicate, rejected = (int(x.replace(",", "")) for x in stored.split("│")[1:5])
    assert stored_count == 0 and rejected == 0 and duplicate == read > 0


def test_batch_recommendations_exclude_history_and_fall_back_for_strangers(trained: Path) -> None:
    import pyarrow.parquet as pq

    events = pq.read_table(trained / "features/interactions.parquet")
    users = pq.read_table(trained / "features/users.parquet")["user_id"].to_pylist()
    items = pq.read_table(trained / "features/items.parquet")["item_id"].to_pylist()
    known = users[0]
    had = {items[i] for i in events.filter(events["user_idx"].to_numpy() == 0)["item_idx"].to_pylist()}
    (trained / "users.txt").write_text(f"{known}\nnobody-knows-me\n")
    run(trained, "recommend", "--users", "users.txt", "--k", "15", "--output", "recs.jsonl")
    lines = [json.loads(line) for line in (trained / "recs.jsonl").read_text().splitlines()]
    assert [line["user_id"] for line in lines] == [known, "nobody-knows-me"]
    assert lines[0]["strategy"] == "personalized" and len(lines[0]["items"]) == 15
    assert not set(lines[0]["items"]) & had
    assert lines[1]["strategy"] == "popular" and len(lines[1]["items"]) == 15


def test_errors_are_one_clear_line_not_a_traceback(trained: Path) -> None:
    result = run(trained, "ingest", "no-such-file.csv", ok=False)
    assert result.returncode == 2
    assert "no-such-file.csv" in result.stderr and "Traceback" not in result.stderr
    result = run(trained, "recommend", "--users", "missing.txt", ok=False)
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_help_explains_every_command(tmp_path: Path) -> None:
    result = run(tmp_path, "--help")
    for command in ("generate", "import", "ingest", "features", "train", "evaluate", "recommend", "demo"):
        assert command in result.stdout
