# make demo: set up and run every built-in service.  make test: set up and run the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck unit bench bench-paths clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# DEMO_ARGS="--port-offset 10000" moves every port when the defaults are taken.
demo: $(STAMP)
	$(BIN)/sockworks demo $(DEMO_ARGS)

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/echo_bench.py $(BENCH_ARGS)

# Every path of the engine against its peer (connect, udp, gopher, echo, idle memory).
bench-paths: $(STAMP)
	$(BIN)/python benchmarks/paths_bench.py $(BENCH_ARGS)

# Worker processes: CPU per request at 1 and N workers, shared socket vs SO_REUSEPORT.
.PHONY: bench-workers
bench-workers: $(STAMP)
	$(BIN)/python benchmarks/workers_bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
