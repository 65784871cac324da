"""Memory and log size of the serving user state after 1M events, before and after a promotion that includes them.

Generated events (recflow.events.synth) are split in time. Version 1 is trained on the first part and version 2
on everything (each by `recflow ingest/features/train` in its own process, as DVC runs them). Then, in this
process, the rest (1M events by default) goes through `OnlineRecommender.record_events` of version 1 in batches,
as POST /events would bring them, into a `LocalUserState` (the single-worker default; `--redis URL` measures a
`RedisUserState` too). Version 2 is then loaded beside the same state, as the service does on a reload, and
`prune_state` drops what it was trained on. Reported at each point: this process's RSS, the log's size and
lines (or the Redis keys' `MEMORY USAGE`), and the RSS of a fresh process that replays the log (the state's own
footprint after a restart). Before the promotion, the service's item view (`refresh_items`) is made over
everything held, once reading every user and once after one more event (which it adds to what it counts).

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=src nice -n 10 python benchmarks/bench_state.py [--events 1000000] [--batch 1000]

Outputs (the project, the logs, bench_state.json) go to benchmarks/out/state/ (git-ignored).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import gc
import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from _common import machine, print_table

from recflow.config import load_settings
from recflow.events.synth import generate_events
from recflow.model.bundle import ModelBundle
from recflow.serving.online import OnlineRecommender
from recflow.serving.userstate import LocalUserState, RedisUserState, UserState

REPO = Path(__file__).resolve().parents[1]
RECFLOW = str(Path(sys.executable).parent / "recflow")
OUT = REPO / "benchmarks" / "out" / "state"
REPLAY = """
import sys, time
from pathlib import Path
from recflow.serving.userstate import LocalUserState
def rss():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) / 1024
before = rss(); began = time.perf_counter()
state = LocalUserState(Path(sys.argv[1]))  # replayed, and compacted as at every start
print(rss() - before, time.perf_counter() - began)
"""


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def recflow(work: Path, *args: str) -> None:
    began = time.perf_counter()
    subprocess.run([RECFLOW, *args], cwd=work, check=True, capture_output=True)
    print(f"  recflow {' '.join(args)}: {time.perf_counter() - began:.0f} s", flush=True)


def build_versions(work: Path, args: argparse.Namespace) -> pa.Table:
    """Train version 1 on the events before the served ones and version 2 on all; returns the served events."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["generate"].update(users=args.users, items=args.items, events=args.history + args.events, days=60)
    params["als"].update(factors=args.factors, iterations=10)
    params["als"]["tune"]["enabled"] = False
    # what is measured is the state, not the choice of model: the two-stage kind, pinned
    params["selection"].update(models=["als_ranker"], half_lives_days=[30], popularity_windows_days=[0])
    params["ranker"].update(n_estimators=60, max_train_users=5000)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    events = generate_events(load_settings(work / "params.yaml").generate)  # sorted by time
    first, served = events.slice(0, args.history), events.slice(args.history)
    for name, part in (("v1", first), ("v2", served)):
        pq.write_table(part, work / f"{name}.parquet")
        recflow(work, "ingest", f"{name}.parquet")
        recflow(work, "features")
        recflow(work, "train")
        shutil.copytree(work / "models" / "bundle", work / name)
    return served


def replayed(path: Path) -> tuple[float, float]:
    """RSS (MB) a fresh process adds by replaying the log, and the seconds it takes."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, "-c", REPLAY, str(path)], check=True, capture_output=True, text=True, env=env)
    mb, seconds = out.stdout.split()
    return float(mb), float(seconds)


def redis_keys(state: RedisUserState) -> list[bytes]:
    hashes = state.client.scan_iter(match=state.prefix + b"*", count=1000)  # the prefix has no glob characters
    return [*hashes, state.changes_key]  # the users' hashes and the change feed


def redis_bytes(state: RedisUserState) -> int:
    """MEMORY USAGE summed over the state's keys."""
    pipe = state.client.pipeline(transaction=False)
    for key in redis_keys(state):
        pipe.memory_usage(key, samples=0)
    return sum(int(b or 0) for b in pipe.execute())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="events sent through record_events")
    parser.add_argument("--history", type=int, default=500_000, help="events version 1 is trained on (before them)")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1000, help="events per record_events call (service.max_events)")
    parser.add_argument("--redis", help="also measure a RedisUserState at this URL (keys under a fresh prefix)")
    args = parser.parse_args()
    print(machine(), flush=True)
    shutil.rmtree(OUT, ignore_errors=True)
    work = OUT / "project"
    work.mkdir(parents=True)
    served = build_versions(work, args)
    settings = load_settings(work / "params.yaml")
    columns = ["user_id", "item_id", "action", "timestamp"]
    served = served.select(columns).set_column(3, "timestamp", pc.cast(served["timestamp"], pa.int64()))  # epoch ms

    stores: list[tuple[str, UserState]] = [("local log", LocalUserState(OUT / "state.jsonl"))]
    if args.redis:
        stores.append(("Redis", RedisUserState(args.redis, f"bench-state:{uuid.uuid4().hex}:")))
    rows: list[list[object]] = []
    report: dict[str, object] = {"args": vars(args), "machine": machine()}
    for name, state in stores:

        def size(state: UserState = state) -> str:
            if isinstance(state, RedisUserState):
                return f"{redis_bytes(state) / 1e6:.0f} MB in Redis"
            assert isinstance(state, LocalUserState)
            with state.path.open("rb") as log:
                lines = sum(1 for _ in log)
            return f"{state.path.stat().st_size / 1e6:.0f} MB, {lines:,} lines"

        def held(state: UserState = state) -> tuple[int, int]:
            users = [u for batch in state.users() for u in batch]
            return len(users), sum(len(e) for e in state.events(users).values())

        v1 = ModelBundle.load(work / "v1")
        recommender = OnlineRecommender(v1, "v1", state, settings.events)
        gc.collect()
        base = rss_mb()
        rows.append([f"{name}: version 1 loaded, empty state", "", f"{base:.0f}", size(), ""])
        began, fold_s = time.perf_counter(), []
        for start in range(0, served.num_rows, args.batch):
            records = served.slice(start, args.batch).to_pylist()
            t = time.perf_counter()
            recommender.record_events(records)
            fold_s.append(time.perf_counter() - t)
            done = start + len(records)
            if done % 200_000 < args.batch:
                print(f"  {name}: {done:,} events, RSS {rss_mb():.0f} MB, {size()}", flush=True)
        fold_s.sort()
        p50, p99 = (fold_s[int(len(fold_s) * q)] * 1e3 for q in (0.5, 0.99))
        per_batch = f"record_events of {args.batch} p50 {p50:.0f} ms, p99 {p99:.0f} ms"
        gc.collect()
        users, events = held()
        rows.append(
            [
                f"{name}: after {served.num_rows:,} events",
                f"{users:,} / {events:,}",
                f"{rss_mb():.0f}",
                size(),
                f"{time.perf_counter() - began:.0f} s; {per_batch}",
            ]
        )
        # the service's item view over everything held: first read of the change feed (every user changed), then
        # the steady state, one more event after its user's others (the view adds it to what it counts)
        t = time.perf_counter()
        view = recommender.refresh_items()
        first_s = time.perf_counter() - t
        recommender.record_events([{**served.slice(served.num_rows - 1, 1).to_pylist()[0], "event_id": "one-more"}])
        t = time.perf_counter()
        recommender.refresh_items()
        again_s = time.perf_counter() - t
        note = f"refresh_items: {first_s:.2f} s reading every user, {again_s:.2f} s after one event"
        rows.append([f"{name}: item view over what is held", f"{view.events:,} counted", f"{rss_mb():.0f}", "", note])
        if isinstance(state, LocalUserState):
            shutil.copy(state.path, OUT / "before-promotion.jsonl")
        del recommender, v1
        gc.collect()
        v2 = ModelBundle.load(work / "v2")
        promoted = OnlineRecommender(v2, "v2", state, settings.events)
        began = time.perf_counter()
        dropped = promoted.prune_state()
        seconds = time.perf_counter() - began
        gc.collect()
        users, events = held()
        rows.append(
            [
                f"{name}: version 2 (trained on them) loaded, pruned",
                f"{users:,} / {events:,}",
                f"{rss_mb():.0f}",
                size(),
                f"prune_state: {dropped:,} events dropped in {seconds:.1f} s",
            ]
        )
        if isinstance(state, LocalUserState):
            state.close()
            for label, path in (("before", OUT / "before-promotion.jsonl"), ("after", state.path)):
                mb, replay_s = replayed(path)
                rows.append([f"{name}: a restart replays the log {label} the promotion", "", f"+{mb:.0f}", "",
                             f"replay {replay_s:.1f} s"])  # fmt: skip
        elif isinstance(state, RedisUserState):
            keys = redis_keys(state)
            for chunk in range(0, len(keys), 1000):
                state.client.delete(*keys[chunk : chunk + 1000])
            state.close()
        del promoted, v2
        gc.collect()
    columns_out = ["point", "users / events held", "RSS MB", "state size", "note"]
    print_table(
        f"user state after {args.events:,} events ({args.users:,} users, {args.items:,} items)", columns_out, rows
    )
    report["rows"] = [dict(zip(columns_out, map(str, row), strict=True)) for row in rows]
    (OUT / "bench_state.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
