# The front door. `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(CURDIR)/$(VENV)/bin

export PATH := $(BIN):$(PATH)
export OPENBLAS_NUM_THREADS := 1
export DVC_NO_ANALYTICS := 1
export BENTOML_DO_NOT_TRACK := True
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.DEFAULT_GOAL := help
LOCK   := requirements.lock

.PHONY: help install lock demo test test-fast lint repro bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# Exact versions from the lock, then recflow itself without resolving anything again: every fresh install is the same.
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed ## Create the virtualenv and install the locked versions of recflow's dependencies and dev tools

# Python 3.11 on Linux x86_64. Versions already in the lock are kept while they still fit pyproject.toml;
# `make lock UPGRADE=--upgrade` re-resolves everything to the newest allowed versions.
lock: ## Regenerate requirements.lock from pyproject.toml (needs uv: pip install uv)
	uv pip compile pyproject.toml --extra dev --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
		$(UPGRADE) -o $(LOCK)

demo: install ## Run the whole batch loop on generated data and print the metrics table
	recflow demo

test: install ## Run the test suite (unit, model and integration tests)
	python -m pytest

test-fast: install ## Run the unit tests only: pure, no processes or training (measured 18 s on 2 cores)
	python -m pytest tests/unit

lint: install ## Check style with ruff and types with mypy (strict on src/recflow, flows/ and bentos/service.py)
	ruff check src tests benchmarks flows bentos
	ruff format --check src tests benchmarks flows bentos
	mypy

repro: install ## Reproduce features, train and evaluate with DVC (after the data step)
	dvc repro

bench: install ## Run the benchmarks (MovieLens accuracy needs ../shared/data/ml-100k)
	python benchmarks/bench_movielens.py
	python benchmarks/bench_ingest.py
	python benchmarks/bench_stream.py
	python benchmarks/bench_scale.py

clean: ## Remove generated outputs (keeps the event store and the virtualenv)
	rm -rf features models/backtest models/bundle models/*.json models/*.csv reports/*.csv dvc_plots
