"""recflow.threads: an entry point sets BLAS to one thread once, and it stays set (no per-call limit undoes it).

Here, not in tests/unit: threadpoolctl runs `ldconfig -p` to find the libraries, and the test fits a tiny ALS."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from threadpoolctl import threadpool_info, threadpool_limits

from recflow.model.candidates import ALSParams, ImplicitCandidates, fit_als
from recflow.threads import limit_blas_threads


def blas_threads() -> set[int]:
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_one_call_sets_blas_to_one_thread_for_good_and_implicit_stays_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    threadpool_limits(2, "blas")  # as if the process had started without the variable
    assert blas_threads() == {2}
    limit_blas_threads()
    assert blas_threads() == {1}
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"  # and for processes started from here
    history = sp.random(60, 40, density=0.2, random_state=0, format="csr", dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # implicit's check_blas_config would warn about a thread pool
        model = fit_als(history, ALSParams(4, 0.1, 1.0, 2, 0))
        ImplicitCandidates(model, history).recommend(np.arange(3), 5)
    assert blas_threads() == {1}  # a fit and a recommendation leave it as it was set
