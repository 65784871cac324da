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
.PHONY: help install demo test lint repro bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## Create the virtualenv and install recflow with its dev tools

demo: install ## Run the whole batch loop on generated data and print the metrics table
	recflow demo

test: install ## Run the test suite (unit, model and integration tests)
	python -m pytest

lint: install ## Check style with ruff
	ruff check src tests benchmarks flows bentos
	ruff format --check src tests benchmarks flows bentos

repro: install ## Reproduce features, train and evaluate with DVC (after the data step)
	dvc repro

bench: install ## Run the benchmarks (MovieLens accuracy needs ../shared/data/ml-100k)
	python benchmarks/bench_movielens.py
	python benchmarks/bench_ingest.py
	python benchmarks/bench_stream.py
	python benchmarks/bench_scale.py

clean: ## Remove generated outputs (keeps the event store and the virtualenv)
	rm -rf features models/backtest models/bundle models/*.json models/*.csv reports/*.csv dvc_plots
