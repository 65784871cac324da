"""Latency and freshness of the HTTP service, against a real `bentoml serve`, from a separate process.

Builds a generated project (generate -> ingest -> features -> train -> evaluate -> deploy, tuning off), starts
`bentoml serve` in its bentos/ folder, and measures with one keep-alive HTTP client (the standard library's: it
costs ~0.5 ms less per request than httpx here, so the figures are the service's), requests one after another:

- /recommend latency p50 / p99 for random known users (the two-stage answer), and the same scoring called
  in-process (`OnlineRecommender.recommend`) as the floor;
- freshness: POST /events (a purchase) then POST /recommend for that user, p50 / p99 of the pair, and the share of
  answers that reflect the event (the bought item gone, the answer changed). Target: p99 <= 30 ms;
- with --swap, a hot swap halfway through the /recommend run: a second version is promoted and the service
  reloads it while requests keep coming (target: 0 failed requests);
- with --rates, /recommend at fixed open-loop arrival rates, --seconds each (target: p99 <= 20 ms at 200 req/s
  with 0 errors).

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_service.py [--items 100000 --users 20000 --events 1000000]
        [--swap] [--rates 50,100,200,400 --seconds 60] [--keep DIR]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import asyncio
import http.client
import itertools
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import yaml
from _common import machine, print_table

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAX_IN_FLIGHT = 64  # open-loop requests outstanding at once; more means the service cannot keep up


def build_project(work: Path, args: argparse.Namespace) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["generate"].update(users=args.users, items=args.items, events=args.events, days=60)
    params["als"].update(factors=args.factors)
    params["als"]["tune"]["enabled"] = False
    params["service"] = {**params.get("service", {}), "reload_check_seconds": 0}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = ["generate", "ingest", "features", "train", "evaluate", "deploy"]
    if args.swap:  # a second version (another ALS seed) to swap to: promoted, then rolled back
        stages += ["set-seed", "train", "evaluate", "deploy --force", "rollback"]
    for stage in stages:
        began = time.perf_counter()
        if stage == "set-seed":
            params["als"]["random_state"] += 1
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            continue
        subprocess.run([str(BIN / "recflow"), *stage.split()], cwd=work, check=True, capture_output=True)
        print(f"{stage}: {time.perf_counter() - began:.1f} s", flush=True)
    (work / "bentos").mkdir()
    for name in ("service.py", "bentofile.yaml"):
        shutil.copy2(REPO / "bentos" / name, work / "bentos" / name)


class Http:
    """One keep-alive HTTP/1.1 connection; JSON in, (status, JSON) out."""

    def __init__(self, base_url: str, timeout: float = 30) -> None:
        self.base_url = base_url
        url = urlsplit(base_url)
        self.connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=timeout)

    def request(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        """One request; once more on a new connection when the server had closed the idle one."""
        data = None if body is None else json.dumps(body)
        headers = {} if data is None else {"content-type": "application/json"}
        for attempt in (1, 2):
            try:
                self.connection.request(method, path, data, headers)
                response = self.connection.getresponse()
                return response.status, json.loads(payload) if (payload := response.read()) else None
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                self.connection.close()  # request() opens a new connection
                if attempt == 2:
                    raise
            except (OSError, http.client.HTTPException):
                self.connection.close()
                raise
        raise AssertionError("unreachable")

    def post(self, path: str, body: object) -> tuple[int, Any]:
        return self.request("POST", path, body)

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)


@contextmanager
def serving(work: Path) -> Iterator[Http]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECFLOW_")}
    env.update(BENTOML_HOME=str(work / ".bentoml-home"), BENTOML_DO_NOT_TRACK="True")
    log = (work / "serve.log").open("w")
    process = subprocess.Popen(
        [str(BIN / "bentoml"), "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=work / "bentos", env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        client = Http(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise SystemExit(f"bentoml serve exited: {(work / 'serve.log').read_text()[-2000:]}")
            try:
                if client.get("/readyz")[0] == 200:
                    break
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise SystemExit("bentoml serve was not ready within 120 s")
            time.sleep(0.5)
        yield client
        client.connection.close()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        log.close()


class Swap:
    """Promotes the project's other version (`recflow deploy --force` of the second training) and asks the
    service to reload, in a thread, while the main thread keeps sending requests."""

    def __init__(self, work: Path) -> None:
        from recflow.config import load_settings
        from recflow.ops.registry import production, rollback, versions

        self.work = work
        self.settings = load_settings(work / "params.yaml")
        found = versions(self.settings, work)
        if len(found) < 2:
            raise SystemExit("--swap needs a project built with --swap (two versions)")
        while production(self.settings, work).version != found[-2].version:
            rollback(self.settings, work, user="bench")  # back to the first version, so there is a swap to do
        self.thread: threading.Thread | None = None
        self.result = ""

    def start(self, base_url: str) -> None:
        def run() -> None:
            from recflow.ops.registry import deploy

            began = time.perf_counter()
            deploy(self.settings, root=self.work, user="bench", force=True)
            status, _ = Http(base_url, timeout=120).post("/reload", {})
            seconds = time.perf_counter() - began
            self.result = f"deploy + reload {seconds:.1f} s (HTTP {status})"

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def done(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()

    def finish(self) -> str:
        assert self.thread is not None
        self.thread.join()
        return self.result


async def open_loop(base_url: str, users: list[str], rate: float, seconds: float, k: int) -> tuple[list[float], int]:
    """/recommend at a fixed arrival rate (requests start on schedule, whether or not earlier ones finished), as
    many users would send them; returns the latencies and the failed requests. A request due while MAX_IN_FLIGHT
    are outstanding counts as failed (the service is overloaded) instead of queueing in the client."""
    latencies: list[float] = []
    failed = in_flight = 0

    async def one(client: httpx.AsyncClient, user: str) -> None:
        nonlocal failed, in_flight
        began = time.perf_counter()
        try:
            response = await client.post("/recommend", json={"user_id": user, "k": k})
            failed += response.status_code != 200
        except httpx.HTTPError:
            failed += 1
        finally:
            in_flight -= 1
        latencies.append((time.perf_counter() - began) * 1000)

    limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client, asyncio.TaskGroup() as group:
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if in_flight >= MAX_IN_FLIGHT:
                failed += 1
                continue
            in_flight += 1
            group.create_task(one(client, users[i % len(users)]))
    return latencies, failed


def percentiles(ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def in_process(work: Path, users: list[str], k: int) -> list[float]:
    """The floor: the service's scoring without HTTP (same bundle, user state in a temporary log)."""
    from recflow.config import load_settings
    from recflow.ops.registry import load_production_bundle
    from recflow.serving.online import OnlineRecommender
    from recflow.serving.userstate import LocalUserState

    settings = load_settings(work / "params.yaml")
    version, bundle = load_production_bundle(settings, work)
    state = LocalUserState(work / "floor-state.jsonl")
    recommender = OnlineRecommender(bundle, version.tag, state, settings.events)
    times = []
    for user in users:
        began = time.perf_counter()
        recommender.recommend(user, k)
        times.append((time.perf_counter() - began) * 1000)
    state.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2000, help="timed /recommend requests")
    parser.add_argument("--pairs", type=int, default=500, help="timed /events + /recommend pairs")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--keep", type=Path, help="build the project here and keep it (default: a temp dir)")
    parser.add_argument("--swap", action="store_true", help="promote a second version halfway through /recommend")
    parser.add_argument("--rates", default="", help="open-loop /recommend rates, e.g. 50,100,200,400 (req/s)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each open-loop rate point")
    args = parser.parse_args()
    print(machine(), flush=True)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-service-"))
    if not (work / "bentos").exists():
        work.mkdir(parents=True, exist_ok=True)
        build_project(work, args)
    swap = Swap(work) if args.swap else None
    rng = np.random.default_rng(0)
    user_ids = [f"u{i:06d}" for i in range(args.users)]
    with serving(work) as client:
        model = client.get("/model")[1]
        for user in rng.choice(user_ids, 200):  # warm-up
            client.post("/recommend", {"user_id": str(user), "k": args.k})
        users = [str(u) for u in rng.choice(user_ids, args.requests)]
        recommend_ms, errors, answered_by = [], 0, []
        for i, user in enumerate(itertools.cycle(users)):
            if swap is not None and i == len(users) // 2:
                swap.start(client.base_url)
            if i >= len(users) and (swap is None or swap.done()):  # with a swap: until it is over
                break
            began = time.perf_counter()
            status, answer = client.post("/recommend", {"user_id": user, "k": args.k})
            recommend_ms.append((time.perf_counter() - began) * 1000)
            errors += status != 200
            answered_by.append(answer.get("model_version") if status == 200 else None)
        swapped = swap.finish() if swap is not None else ""
        rate_rows = []
        for rate in (float(r) for r in args.rates.split(",") if r):
            latencies, failed = asyncio.run(open_loop(client.base_url, users, rate, args.seconds, args.k))
            p50, p99 = percentiles(latencies)
            note = f"{failed} failed ({failed / (rate * args.seconds):.1%})"
            rate_rows.append([f"open loop {rate:g} req/s for {args.seconds:g} s", len(latencies), p50, p99, note])
        pair_ms, pair_errors, reflected = [], 0, 0
        for user in (str(u) for u in rng.choice(user_ids, args.pairs, replace=False)):
            before = [i["item_id"] for i in client.post("/recommend", {"user_id": user, "k": args.k})[1]["items"]]
            bought = before[int(rng.integers(len(before)))]
            event = {"user_id": user, "item_id": bought, "action": "purchase", "timestamp": int(time.time())}
            began = time.perf_counter()
            accepted, _ = client.post("/events", {"events": [event]})
            status, after = client.post("/recommend", {"user_id": user, "k": args.k})
            pair_ms.append((time.perf_counter() - began) * 1000)
            pair_errors += accepted != 200 or status != 200
            items = [i["item_id"] for i in after["items"]]
            reflected += bought not in items and items != before
    floor_ms = in_process(work, users[:500], args.k)
    http50, http99 = percentiles(recommend_ms)
    floor50, floor99 = percentiles(floor_ms)
    pair50, pair99 = percentiles(pair_ms)
    title = (
        f"service ({model['tag']}, {args.items:,} items, {args.factors} factors, ranker {model['model']}), "
        "sequential keep-alive client, ms"
    )
    ratio = f"HTTP p50 / floor p50 = {http50 / floor50:.2f}"
    rows: list[list[object]] = [
        ["POST /recommend over HTTP", len(recommend_ms), http50, http99, f"{errors} errors"],
        ["same scoring in-process (floor)", len(floor_ms), floor50, floor99, ratio],
        [
            "POST /events + POST /recommend",
            len(pair_ms),
            pair50,
            pair99,
            f"{pair_errors} errors, reflected {reflected}",
        ],
    ]
    rows += rate_rows
    if swap is not None:
        versions = " -> ".join(dict.fromkeys(v.split(":")[-1] for v in answered_by if v))
        rows.append(["hot swap during the /recommend run", len(recommend_ms), "", "", f"{swapped}; {versions}"])
    print_table(title, ["measure", "n", "p50", "p99", "errors / note"], rows)


if __name__ == "__main__":
    main()
