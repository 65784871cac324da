"""Speed and memory of the batch stages on generated data (default 10M events, 500k users, 50k items).

Each stage runs as its own `recflow` process (as DVC runs it), timed with its peak memory. Then the ALS
stage (confidence matrix + fit) is compared with a bare implicit `fit` on the same matrix, in the same run.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_scale.py [--events 10000000] [--repeats 3] [--sample-users N]
        [--no-tune] [--param SECTION.KEY=VALUE ...]

The train stage runs as params.yaml says (one model selection on validation folds, ALS tuning, backtest and
deployable fits); `--sample-users`, `--no-tune` and `--param` (any params.yaml value, YAML-parsed) limit the
selection, and the table's title says how.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import machine, print_table

REPO = Path(__file__).resolve().parents[1]
RECFLOW = str(Path(sys.executable).parent / "recflow")


def run_stage(cwd: Path, *args: str) -> tuple[float, float]:
    """Run `recflow ARGS` in cwd; returns (seconds, peak RSS in GB) of that process."""
    began = time.perf_counter()
    process = subprocess.Popen([RECFLOW, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - began
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"recflow {' '.join(args)} failed: {process.stderr.read().decode() if process.stderr else ''}")
    return elapsed, usage.ru_maxrss / 1024**2


def als_versus_bare(work: Path, repeats: int) -> tuple[list[float], list[float], int]:
    """Seconds of recflow's ALS stage (matrix + fit) and of a bare implicit fit on the same matrix."""
    from implicit.cpu.als import AlternatingLeastSquares

    from recflow.config import load_settings
    from recflow.model.candidates import ALSParams, fit_als
    from recflow.model.features import PRODUCTION, action_weights, confidence_matrix, load_interactions, window

    settings = load_settings(work / "params.yaml")
    inter, meta = load_interactions(work / "features")
    params = ALSParams.from_settings(settings.als)
    stage, bare = [], []
    for _ in range(repeats):
        began = time.perf_counter()
        win = window(inter, PRODUCTION, str(meta["summary"]["method"]), meta["cuts"])
        matrix = confidence_matrix(win.history, action_weights(settings, inter.actions), 30.0)
        fit_als(matrix, params)
        stage.append(time.perf_counter() - began)
        model = AlternatingLeastSquares(
            factors=params.factors,
            regularization=params.regularization,
            alpha=params.alpha,
            iterations=params.iterations,
            random_state=params.random_state,
        )
        began = time.perf_counter()
        model.fit(matrix, show_progress=False)  # BLAS threads as recflow runs them: one, set at the top
        bare.append(time.perf_counter() - began)
    return stage, bare, matrix.nnz


def _summary(seconds: list[float]) -> list[str]:
    return [f"{statistics.median(seconds):.1f}", " ".join(f"{s:.1f}" for s in seconds)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=500_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sample-users", type=int, help="selection.sample_users (default: params.yaml's)")
    parser.add_argument("--no-tune", action="store_true", help="ALS tuning off (als.tune.enabled false)")
    parser.add_argument("--param", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="set a params.yaml value, e.g. selection.half_lives_days=[30] (repeatable)")  # fmt: skip
    args = parser.parse_args()
    print(machine())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["generate"].update(events=args.events, users=args.users, items=args.items)
    if args.no_tune:
        params["als"]["tune"]["enabled"] = False
    if args.sample_users is not None:
        params["selection"]["sample_users"] = args.sample_users
    for item in args.param:
        key, _, value = item.partition("=")
        *sections, name = key.split(".")
        target = params
        for section in sections:
            target = target[section]
        if name not in target:
            raise SystemExit(f"--param {item}: params.yaml has no {key}")
        target[name] = yaml.safe_load(value)
    limits = f"selection.sample_users {params['selection']['sample_users']:,}, ALS tuning " + (
        "on" if params["als"]["tune"]["enabled"] else "off"
    )
    limits += "".join(f", {item}" for item in args.param)
    stages = ("generate", "ingest", "features", "train")
    results: dict[str, list[tuple[float, float]]] = {s: [] for s in stages}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        for _ in range(args.repeats):
            for path in ("data", "features", "models"):
                subprocess.run(["rm", "-rf", str(work / path)], check=True)
            for stage in stages:
                results[stage].append(run_stage(work, stage))
        report = json.loads((work / "models" / "train_report.json").read_text())
        stage_s, bare_s, nnz = als_versus_bare(work, args.repeats)

    rows = [
        [stage, *_summary([r[0] for r in results[stage]]), f"{max(r[1] for r in results[stage]):.2f}"]
        for stage in stages
    ]
    batch = [results["features"][i][0] + results["train"][i][0] for i in range(args.repeats)]
    rows.append(["features + train", *_summary(batch), ""])
    print_table(
        f"{args.events:,} events, {args.users:,} users, {args.items:,} items; {limits}",
        ["stage", "median s", "runs s", "peak RSS GB"],
        rows,
    )
    print(f"served kind {report['kind']}: {report['decided']}")
    print_table(
        "the train stage's parts (last run)",
        ["part", "s"],
        [[part, f"{seconds:.1f}"] for part, seconds in report["seconds"].items()],
    )
    ratio = statistics.median(stage_s) / statistics.median(bare_s)
    print_table(
        f"ALS stage against a bare implicit fit on the same matrix ({nnz:,} non-zeros)",
        ["what", "median s", "runs s"],
        [
            ["recflow ALS stage (matrix + fit)", *_summary(stage_s)],
            ["bare implicit fit", *_summary(bare_s)],
            ["ratio", f"{ratio:.2f}", ""],
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
