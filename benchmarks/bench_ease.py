"""EASE's item x item weights: recflow's `ease_weights` (float32, Gram built in column blocks, LAPACK's in-place
Cholesky inverse on every core for that call) against the textbook float64 `np.linalg.inv` of the same matrix, side
by side in one run, each in its own process (time and peak RSS of that process).

    python benchmarks/bench_ease.py [--items 8000,17632] [--users 6040] [--events 600000] [--repeats 2]
        [--textbook-max-items 8000]

The interactions are drawn with Zipf-distributed item popularity (a long tail, as real catalogues have); the
textbook inverse is skipped above --textbook-max-items (it needs three float64 items x items matrices).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import multiprocessing
import statistics
import time

import numpy as np
import scipy.sparse as sp
from _common import machine, peak_rss_gb, print_table


def _history(users: int, items: int, events: int) -> sp.csr_matrix:
    rng = np.random.default_rng(0)
    columns = np.minimum(rng.zipf(1.3, events) - 1, items - 1)
    rows = rng.integers(0, users, events)
    return sp.csr_matrix((np.ones(events, np.float32), (rows, columns)), shape=(users, items))


def _textbook(history: sp.csr_matrix, regularization: float) -> np.ndarray:
    binary = history.copy().astype(np.float64)
    binary.data[:] = 1.0
    gram = np.asarray((binary.T @ binary).todense())
    gram[np.diag_indices_from(gram)] += regularization
    inverse = np.linalg.inv(gram)
    weights = -inverse / np.diag(inverse)
    weights[np.diag_indices_from(weights)] = 0.0
    return weights.astype(np.float32)


def _run(way: str, users: int, items: int, events: int, queue: multiprocessing.Queue) -> None:
    from recflow.model.candidates import ease_weights
    from recflow.threads import limit_blas_threads

    limit_blas_threads()  # as every recflow entry point does
    history = _history(users, items, events)
    began = time.perf_counter()
    (ease_weights if way == "recflow" else _textbook)(history, 200.0)
    queue.put((time.perf_counter() - began, peak_rss_gb()))


def measure(way: str, users: int, items: int, events: int) -> tuple[float, float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run, args=(way, users, items, events, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", default="8000,17632")
    parser.add_argument("--users", type=int, default=6040)
    parser.add_argument("--events", type=int, default=600_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--textbook-max-items", type=int, default=8000)
    args = parser.parse_args()
    print(machine(), f"{len(os.sched_getaffinity(0))} usable cores")
    rows = []
    for items in (int(n) for n in args.items.split(",")):
        ways = ["recflow"] + (["textbook"] if items <= args.textbook_max_items else [])
        runs: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
        for _ in range(args.repeats):
            for way in ways:  # alternated, so both see the same load
                runs[way].append(measure(way, args.users, items, args.events))
        for way in ways:
            seconds = [s for s, _ in runs[way]]
            name = "recflow ease_weights (float32, in-place Cholesky)" if way == "recflow" else "textbook float64 inv"
            rows.append([f"{items:,}", name, f"{statistics.median(seconds):.1f}",
                         " ".join(f"{s:.1f}" for s in seconds), f"{max(m for _, m in runs[way]):.2f}"])  # fmt: skip
    print_table(
        f"EASE weights, {args.users:,} users, {args.events:,} events (Zipf items)",
        ["items", "way", "median s", "runs s", "peak RSS GB"],
        rows,
    )


if __name__ == "__main__":
    main()
