"""BLAS threads, set once per process by each entry point (the CLI, the Prefect flows; the service sets the same
variable before numpy is imported, in bentos/service.py).

implicit's ALS runs its own threads, and the fold-in's small solves and the scoring's dot products are a few
microseconds each: an OpenBLAS thread pool beside them makes both several times slower, and implicit warns about it
(`implicit.utils.check_blas_config`, when an `AlternatingLeastSquares` is created). So recflow runs BLAS on one
thread, set at start-up and never per call: entering `threadpoolctl.threadpool_limits` costs 1.4 ms with
threadpoolctl 3.6 and 5.3 ms with 3.8, which a per-call limit paid on every batch of recommendations. The one
exception is EASE's inverse (`model.candidates.ease_weights`): a single LAPACK call of seconds to minutes, which takes
every core the process may use for its duration.
"""

from __future__ import annotations

import os

from threadpoolctl import threadpool_limits

__all__ = ["limit_blas_threads"]


def limit_blas_threads() -> None:
    """One BLAS thread for this process and the processes it starts: `OPENBLAS_NUM_THREADS=1` for BLAS libraries
    loaded from now on (numpy is imported lazily by most stages), and threadpoolctl's process-wide limit, applied
    once (not as a context manager, so it is never undone), for those already loaded."""
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    threadpool_limits(1, "blas")
