"""Capacity, latency and freshness of the HTTP service against a real `bentoml serve`, each figure as a ratio to the
in-process scoring of the same bundle in the same run.

Builds a generated project (generate -> ingest -> features -> train -> evaluate -> deploy, tuning off), starts
`bentoml serve` in its bentos/ folder and, beside it, `bare_asgi.py` (the same /recommend on plain Starlette under
uvicorn, no BentoML), then measures:

- capacity: `wrk -t1 -c{connections} --latency` POST /recommend (k random known users, bodies from a Lua script,
  benchmarks/wrk_post.lua) against the service and the bare app, alternately, --repeats times each: requests/s,
  p50/p99, errors. Capacity / floor capacity (1000 / in-process p50) is the issue #11 target (>= 0.6, 0 errors);
  service / bare app is BentoML's own share;
- with --rates, wrk paced to each rate (see wrk_post.lua: closed-loop, no catch-up after a late answer);
- freshness with one keep-alive Python client (the standard library's; wrk cannot chain requests): POST /events (a
  purchase) then POST /recommend for that user, both timed; /events p50 / /recommend p50 (target <= 1.5) and the
  pair p50 / /recommend p50 (target <= 2.2), and the share of answers that reflect the event;
- the floor: the service's library calls in-process, one after another: `OnlineRecommender.recommend` (before
  each pair of wrk runs, so each capacity ratio compares figures taken under the same load), and what POST /events
  runs (validate, append to the event log, fold in) for one event, after the pairs;
- with --swap, a hot swap during a wrk run against the service: a second version is promoted and reloaded while
  requests keep coming (target: 0 errors).

Every row carries the 1-minute load average when it was measured: the machine is shared, so only ratios measured
side by side mean anything. The table, the wrk reports and a JSON summary go to benchmarks/out/service-<time>/.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_service.py [--users 943 --items 1682 --events 100000]
        [--seconds 20 --repeats 2 --connections 4] [--rates 50,100,150] [--swap] [--keep DIR]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import http.client
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
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import yaml
from _common import machine, print_table

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
WRK_SCRIPT = HERE / "wrk_post.lua"
STACK = ("bentoml", "uvicorn", "starlette", "pydantic", "uvloop", "httptools", "duckdb", "threadpoolctl")


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


def load() -> float:
    """The 1-minute load average: how busy the shared machine was."""
    return os.getloadavg()[0]


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server(command: list[str], cwd: Path, log: Path, ready_path: str) -> Iterator[str]:
    """Run `command` (which serves on the port it was given) until the block ends; yields its base URL once
    GET `ready_path` answers 200."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECFLOW_")}
    env.update(BENTOML_HOME=str(cwd / ".bentoml-home"), BENTOML_DO_NOT_TRACK="True")
    with log.open("w") as out:
        process = subprocess.Popen(
            [*command, "--port", str(port)], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            base_url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                if process.poll() is not None:
                    raise SystemExit(f"{command[0]} exited: {log.read_text()[-2000:]}")
                try:
                    if Http(base_url, timeout=5).get(ready_path)[0] == 200:
                        break
                except (OSError, http.client.HTTPException):
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"{command[0]} was not ready within 120 s")
                time.sleep(0.5)
            yield base_url
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)


@dataclass(frozen=True)
class WrkRun:
    """One wrk run, from wrk_post.lua's JSON line."""

    label: str
    requests: int
    seconds: float
    errors: int
    p50: float
    p90: float
    p99: float
    max: float
    load: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def wrk(
    label: str, base_url: str, bodies: Path, out: Path, *, seconds: float, connections: int, rate: float = 0
) -> WrkRun:
    """POST /recommend with wrk (one thread; paced to `rate` req/s when given); the report is kept in `out`."""
    command = [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(WRK_SCRIPT), base_url,
        "--", "/recommend", str(bodies), *([f"{rate:g}"] if rate else []),
    ]  # fmt: skip
    report = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    name = label.replace(" ", "-").replace("/", "")
    (out / f"wrk-{name}.txt").write_text(f"$ {' '.join(command)}\n{report}")
    line = next(x for x in report.splitlines() if x.startswith("wrk-json "))
    result = json.loads(line.removeprefix("wrk-json "))
    latency = result["latency_ms"]
    return WrkRun(
        label, result["requests"], result["duration_s"], sum(result["errors"].values()),
        latency["p50"], latency["p90"], latency["p99"], latency["max"], load(),
    )  # fmt: skip


def median_run(runs: list[WrkRun]) -> WrkRun:
    """The run of median throughput (of an odd count; the lower middle of an even one)."""
    return sorted(runs, key=lambda r: r.rate)[(len(runs) - 1) // 2]


class Swap:
    """Promotes the project's other version (`recflow deploy --force` of the second training) and asks the
    service to reload, in a thread, while wrk keeps sending requests."""

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
        self.result = "not finished within the run"

    def start(self, base_url: str, after: float) -> None:
        def run() -> None:
            from recflow.ops.registry import deploy

            time.sleep(after)
            began = time.perf_counter()
            deploy(self.settings, root=self.work, user="bench", force=True)
            status, _ = Http(base_url, timeout=120).post("/reload", {})
            self.result = f"deploy + reload {time.perf_counter() - began:.1f} s (HTTP {status})"

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def finish(self) -> str:
        assert self.thread is not None
        self.thread.join()
        return self.result


class InProcess:
    """The floor: the service's library calls without HTTP, one after another, in this process (same bundle; user
    state and event log in a temporary folder). Measured between the wrk runs, so each ratio compares figures
    taken under the same load."""

    def __init__(self, work: Path, folder: Path, k: int) -> None:
        from recflow.config import load_settings
        from recflow.ops.registry import load_production_bundle
        from recflow.serving.online import OnlineRecommender
        from recflow.serving.userstate import LocalUserState
        from recflow.stream.log import open_event_log

        settings = load_settings(work / "params.yaml")
        version, bundle = load_production_bundle(settings, work)
        self.state = LocalUserState(folder / "state.jsonl")
        self.log = open_event_log(settings.eventlog, folder)
        self.recommender = OnlineRecommender(bundle, version.tag, self.state, settings.events)
        self.k = k

    def recommend(self, users: list[str]) -> list[float]:
        """ms per `OnlineRecommender.recommend`."""
        times = []
        for user in users:
            began = time.perf_counter()
            self.recommender.recommend(user, self.k)
            times.append((time.perf_counter() - began) * 1000)
        return times

    def events(self, users: list[str]) -> list[float]:
        """ms per one-event POST /events without HTTP: what the service runs, in its order (validate, append to the
        event log, fold in), for a purchase of one of the user's recommended items."""
        times = []
        for user in users:
            item = self.recommender.recommend(user, self.k).items[0][0]
            event = {"user_id": user, "item_id": item, "action": "purchase", "timestamp": int(time.time())}
            began = time.perf_counter()
            batch = self.recommender.validate_events([event])
            self.log.append([{key: v for key, v in row.items() if v is not None} for row in batch.accepted.to_pylist()])
            self.recommender.apply_events(batch)
            times.append((time.perf_counter() - began) * 1000)
        return times

    def close(self) -> None:
        self.state.close()


@dataclass(frozen=True)
class Pairs:
    events: list[float]
    recommend: list[float]
    pair: list[float]
    errors: int
    reflected: int
    load: float


def freshness(client: Http, users: list[str], k: int, rng: np.random.Generator) -> Pairs:
    """POST /events (a purchase of one of the user's recommended items) then POST /recommend, each timed."""
    events_ms, recommend_ms, pair_ms, errors, reflected = [], [], [], 0, 0
    for user in users:
        before = [i["item_id"] for i in client.post("/recommend", {"user_id": user, "k": k})[1]["items"]]
        bought = before[int(rng.integers(len(before)))]
        event = {"user_id": user, "item_id": bought, "action": "purchase", "timestamp": int(time.time())}
        began = time.perf_counter()
        accepted, _ = client.post("/events", {"events": [event]})
        answered = time.perf_counter()
        status, after = client.post("/recommend", {"user_id": user, "k": k})
        ended = time.perf_counter()
        events_ms.append((answered - began) * 1000)
        recommend_ms.append((ended - answered) * 1000)
        pair_ms.append((ended - began) * 1000)
        errors += accepted != 200 or status != 200
        items = [i["item_id"] for i in after["items"]] if status == 200 else []
        reflected += bought not in items and items != before
    return Pairs(events_ms, recommend_ms, pair_ms, errors, reflected, load())


def p50(ms: list[float]) -> float:
    return float(np.percentile(ms, 50))


def p99(ms: list[float]) -> float:
    return float(np.percentile(ms, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=943, help="generated users (default: ml-100k's count)")
    parser.add_argument("--items", type=int, default=1682)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each wrk run")
    parser.add_argument("--repeats", type=int, default=2, help="wrk runs per server, alternating service and bare app")
    parser.add_argument("--connections", type=int, default=4, help="wrk connections")
    parser.add_argument("--rates", default="", help="paced /recommend points, e.g. 50,100,150 (req/s)")
    parser.add_argument("--floor", type=int, default=1000, help="in-process recommend calls")
    parser.add_argument("--pairs", type=int, default=300, help="timed /events + /recommend pairs (distinct users)")
    parser.add_argument("--swap", action="store_true", help="promote a second version during a wrk run")
    parser.add_argument("--keep", type=Path, help="build the project here and keep it (default: a temp dir)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    versions = ", ".join(f"{name} {version(name)}" for name in STACK)
    print(machine(), versions, sep="\n", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = REPO / "benchmarks" / "out" / f"service-{stamp}"
    out.mkdir(parents=True)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-service-"))
    if not (work / "bentos").exists():
        work.mkdir(parents=True, exist_ok=True)
        build_project(work, args)
    swap = Swap(work) if args.swap else None
    rng = np.random.default_rng(0)
    user_ids = [f"u{i:06d}" for i in range(args.users)]
    bodies = out / "recommend-bodies.jsonl"
    bodies.write_text("".join(json.dumps({"user_id": str(u), "k": args.k}) + "\n" for u in rng.choice(user_ids, 5000)))
    pair_users = [str(u) for u in rng.choice(user_ids, min(args.pairs, args.users), replace=False)]
    floor_users = [str(u) for u in rng.choice(user_ids, args.floor)]
    paired = set(pair_users)
    floor_event_users = [u for u in user_ids if u not in paired][: args.pairs]
    runs: dict[str, list[WrkRun]] = {"service": [], "bare": []}
    floor_ms: list[list[float]] = []  # one sample before each pair of wrk runs
    with ExitStack() as stack:
        floor = InProcess(work, Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-floor-"))), args.k)
        stack.callback(floor.close)
        floor.recommend(floor_users[:100])  # warm-up
        service_url = stack.enter_context(
            server(
                [str(BIN / "bentoml"), "serve", "--host", "127.0.0.1"], work / "bentos", out / "serve.log", "/readyz"
            )
        )
        bare_url = stack.enter_context(
            server([sys.executable, str(HERE / "bare_asgi.py"), str(work)], work, out / "bare.log", "/healthz")
        )
        model = Http(service_url).get("/model")[1]
        for url in (service_url, bare_url):  # warm-up
            wrk("warm-up", url, bodies, out, seconds=3, connections=args.connections)
        for repeat in range(args.repeats):
            floor_ms.append(floor.recommend(floor_users))
            for name, url in (("service", service_url), ("bare", bare_url)):
                runs[name].append(
                    wrk(f"{name} {repeat + 1}", url, bodies, out, seconds=args.seconds, connections=args.connections)
                )
        floor_load = load()
        rates = [float(r) for r in args.rates.split(",") if r]
        paced = [
            wrk(f"paced {r:g}", service_url, bodies, out, seconds=args.seconds, connections=args.connections, rate=r)
            for r in rates
        ]
        swapped = None
        if swap is not None:
            before = Http(service_url).get("/model")[1]["tag"]
            swap.start(service_url, after=5)
            swap_run = wrk("service during swap", service_url, bodies, out, seconds=60, connections=args.connections)
            result = swap.finish()
            swapped = (swap_run, f"{result}; {before} -> {Http(service_url).get('/model')[1]['tag']}")
        pairs = freshness(Http(service_url), pair_users, args.k, rng)
        events_floor = floor.events(floor_event_users)
        events_load = load()

    # each wrk run against the floor measured just before it; the median over the repeats
    floor_rates = [1000 / p50(ms) for ms in floor_ms]
    ratios = {name: [r.rate / f for r, f in zip(rs, floor_rates, strict=True)] for name, rs in runs.items()}
    floor50 = p50([t for ms in floor_ms for t in ms])
    floor_rate = 1000 / floor50
    service, bare = median_run(runs["service"]), median_run(runs["bare"])
    events50, recommend50 = p50(pairs.events), p50(pairs.recommend)
    title = (
        f"service ({model['tag']}, {args.users:,} users, {args.items:,} items, {args.events:,} events, "
        f"{args.factors} factors, model {model['model']}, k={args.k}); ms"
    )

    def capacity_row(label: str, run: WrkRun, ratio: float, note: str) -> list[object]:
        return [label, run.requests, f"{run.rate:.1f}", run.p50, run.p99, f"{ratio:.2f}",
                f"{run.errors} errors; {note}", f"{run.load:.1f}"]  # fmt: skip

    def each(values: list[float], digits: int) -> str:
        return " ".join(f"{v:.{digits}f}" for v in values)

    c = args.connections
    service_vs_bare = [s.rate / b.rate for s, b in zip(runs["service"], runs["bare"], strict=True)]
    rows: list[list[object]] = [
        ["in-process OnlineRecommender.recommend (floor)", sum(map(len, floor_ms)), f"{floor_rate:.1f}", floor50,
         p99([t for ms in floor_ms for t in ms]), "1.00",
         f"floor capacity = 1000 / p50; before each wrk pair: {each(floor_rates, 0)} req/s", f"{floor_load:.1f}"],
        capacity_row(f"wrk -c{c} POST /recommend, bentoml serve", service, float(np.median(ratios["service"])),
                     f"runs {each([r.rate for r in runs['service']], 0)} req/s = {each(ratios['service'], 2)} "
                     "x floor (median; target >= 0.60)"),
        capacity_row(f"wrk -c{c} POST /recommend, bare Starlette", bare, float(np.median(ratios["bare"])),
                     f"runs {each([r.rate for r in runs['bare']], 0)} req/s; service / bare "
                     f"{each(service_vs_bare, 2)}"),
    ]  # fmt: skip
    rows += [
        capacity_row(f"wrk -c{c} paced to {rate:g} req/s", run, run.rate / floor_rate, "bentoml serve")
        for rate, run in zip(rates, paced, strict=True)
    ]
    if swapped is not None:
        rows.append(capacity_row(f"wrk -c{c} during a hot swap", swapped[0], swapped[0].rate / floor_rate, swapped[1]))
    rows += [
        ["in-process one-event POST /events (floor)", len(events_floor), "", p50(events_floor), p99(events_floor),
         "", f"{p50(events_floor) / floor50:.2f}x the recommend floor p50", f"{events_load:.1f}"],
        ["POST /events (one purchase), sequential client", len(pairs.events), "", events50, p99(pairs.events), "",
         f"{events50 / recommend50:.2f}x /recommend p50 (target <= 1.5)", f"{pairs.load:.1f}"],
        ["POST /recommend after it, same client", len(pairs.recommend), "", recommend50, p99(pairs.recommend), "",
         f"{recommend50 / floor50:.2f}x the floor p50", f"{pairs.load:.1f}"],
        ["freshness pair: /events then /recommend", len(pairs.pair), "", p50(pairs.pair), p99(pairs.pair), "",
         f"{p50(pairs.pair) / recommend50:.2f}x /recommend p50 (target <= 2.2); {pairs.errors} errors; "
         f"{pairs.reflected}/{len(pairs.pair)} reflect the event", f"{pairs.load:.1f}"],
    ]  # fmt: skip
    columns = ["measure", "n", "req/s", "p50", "p99", "x floor capacity", "note", "load"]
    print_table(title, columns, rows)
    summary = {
        "title": title,
        "machine": machine(),
        "versions": versions,
        "args": {k: str(v) for k, v in vars(args).items()},
        "columns": columns,
        "rows": rows,
        "wrk": {name: [asdict(r) for r in rs] for name, rs in {**runs, "paced": paced}.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    cells = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    markdown = [f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}", *(f"| {' | '.join(r)} |" for r in cells)]
    (out / "table.md").write_text("\n".join([title, "", *markdown, ""]))
    print(f"wrk reports, table.md and summary.json: {out}")


if __name__ == "__main__":
    main()
