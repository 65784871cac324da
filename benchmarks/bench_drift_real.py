"""Calibration of the drift check on real events: false alarms over random no-drift splits, detection of planted
drifts of stated sizes, and a real change (MovieLens five months later).

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=src nice -n 10 python benchmarks/bench_drift_real.py            # 200 + 40
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_drift_real.py --splits 40 --planted 10  # quick

Reads the development sets from ../shared/data at run time (skips a set that is absent; never copies them):
- ml-100k: a random 35-day span of ratings, its users dealt into five groups laid into five 7-day slots
  (the reference week's two-week lookback, the week before the reference week - with the one before it the current
  week's lookback -, the reference week, the current week) - recflow.ops.drift_calibration;
- YooChoose clicks: a random 5-day span of sessions, dealt into five 1-day slots.
Each no-drift split is judged by recflow.ops.drift.judge with params.yaml `drift` (windows resized to the slots);
the planted drifts change the current slot of the first `--planted` splits. Writes
benchmarks/out/drift_real/{calibration.csv,summary.md,calibration.png} (git-ignored).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _common import machine

from recflow.config import Settings, load_settings
from recflow.ops import drift_calibration as dc
from recflow.ops.drift import DRIFT, NOT_ENOUGH_DATA, drift_windows, event_frames, judge

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OUT = Path(__file__).resolve().parent / "out" / "drift_real"
DAY_MS = 86_400_000
SETS = {  # name -> (reader, file, span days, slot days)
    "ml-100k": (dc.read_movielens, DATA / "ml-100k", 35.0, 7.0),
    "yoochoose": (dc.read_yoochoose, DATA / "yoochoose-clicks-100k" / "yoochoose-clicks-100k_train_full.txt", 5.0, 1.0),
}
SIZES = {"new_items": (0.05, 0.1, 0.2), "popularity": (0.1, 0.2, 0.3), "action_mix": (0.1, 0.2, 0.3)}
MIN_USERS_TARGET = 40  # the target: false alarms over splits with >= 40 users per window


def judged(case: dc.Case) -> dict[str, object]:
    windows = drift_windows(case.end, case.settings)
    frames = event_frames(case.events, windows, case.settings)
    status, _, datasets = judge(frames, case.settings)
    users = min(len(frames["users"].reference), len(frames["users"].current))
    flagged = sorted({f"{d.name}.{c.column}" for d in datasets for c in d.columns if c.drifted})
    return {"status": status, "min_users": users, "flagged": " ".join(flagged)}


def run_set(name: str, settings: Settings, splits: int, planted: int, seed: int) -> list[dict[str, object]]:
    reader, path, span, slot = SETS[name]
    events = reader(path)
    rng = np.random.default_rng(seed)
    first, last = int(events["ts"].min()), int(events["ts"].max())
    starts = rng.integers(first, last - round(span * DAY_MS), size=splits)
    rows: list[dict[str, object]] = []
    for i, start in enumerate(starts):
        case = dc.no_drift_case(events, int(start), span, slot, settings, rng)
        rows.append({"set": name, "case": "no drift", "size": 0.0, "split": i, **judged(case)})
        if i >= planted:
            continue
        for kind, sizes in SIZES.items():
            for size in sizes:
                changed = dc.PLANTS[kind](case, size, rng)
                rows.append({"set": name, "case": kind, "size": size, "split": i, **judged(changed)})
    if name == "ml-100k":  # the real change: the current week from a month five months later
        for i in range(planted):
            start = first + int(rng.integers(0, 40)) * DAY_MS
            case = dc.later_case(events, start, start + 150 * DAY_MS, span, slot, settings, rng)
            rows.append({"set": name, "case": "5 months later", "size": 0.0, "split": i, **judged(case)})
    return rows


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    judged_rows = frame[frame["status"] != NOT_ENOUGH_DATA]
    # false alarms count over splits with >= 40 users per window (the target); detection over every judged case
    enough = judged_rows[(judged_rows["min_users"] >= MIN_USERS_TARGET) | (judged_rows["case"] != "no drift")]
    groups = []
    for (name, case, size), part in frame.groupby(["set", "case", "size"], sort=False):
        sub = enough[(enough["set"] == name) & (enough["case"] == case) & (enough["size"] == size)]
        top = sub["flagged"].str.split().explode().value_counts().head(3)
        groups.append(
            {
                "set": name,
                "case": case,
                "size": size,
                "cases": len(part),
                "not enough data": int((part["status"] == NOT_ENOUGH_DATA).sum()),
                "judged": len(sub),
                "flagged": int((sub["status"] == DRIFT).sum()),
                "rate": round(float((sub["status"] == DRIFT).mean()) if len(sub) else float("nan"), 3),
                "columns flagged most": ", ".join(f"{k} {v}" for k, v in top.items()),
            }
        )
    return pd.DataFrame(groups)


def plot(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(summary["set"].unique())
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4), squeeze=False)
    for ax, name in zip(axes[0], sets, strict=True):
        part = summary[summary["set"] == name]
        for kind in SIZES:
            rows = part[part["case"] == kind]
            ax.plot(rows["size"], rows["rate"], marker="o", label=f"planted {kind}")
        false_alarms = float(part[part["case"] == "no drift"]["rate"].iloc[0])
        ax.axhline(false_alarms, color="red", linestyle="--", label=f"false alarms, no drift ({false_alarms:.1%})")
        ax.axhline(0.9, color="grey", linestyle=":", label="detection target 90%")
        ax.set(
            title=name, xlabel="planted size (share of the current window's events)", ylabel="flagged", ylim=(0, 1.05)
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", type=int, default=200, help="random no-drift splits per data set")
    parser.add_argument("--planted", type=int, default=40, help="splits that also get each planted drift")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    settings = load_settings(args.params)
    began = time.perf_counter()
    rows = []
    for name, (_, path, _, _) in SETS.items():
        if not path.exists():
            print(f"skipped {name}: {path} not found (the development sets are never part of the repo)")
            continue
        rows += run_set(name, settings, args.splits, args.planted, args.seed)
    frame = pd.DataFrame(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    frame.to_csv(OUT / "calibration.csv", index=False)
    summary = summarize(frame)
    (OUT / "summary.md").write_text(summary.to_markdown(index=False) + "\n")
    plot(summary, OUT / "calibration.png")
    print(machine())
    print(
        f"{time.perf_counter() - began:.0f} s; alpha {settings.drift.alpha}, {settings.drift.permutations} permutations"
    )
    print(f"drift verdicts on real windows (no drift: judged = splits with >= {MIN_USERS_TARGET} users per window)")
    print(summary.to_markdown(index=False))
    print(f"wrote {OUT}/calibration.csv, summary.md, calibration.png")


if __name__ == "__main__":
    main()
