# Developer commands. Each target creates the virtualenv it needs (Python 3.10+ only).
# Real services are used when DATABASE_URL / REDIS_URL / AMQP_URL are set; otherwise
# SQLite and an embedded redis-server that the suite or the demo starts and stops itself.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# make bench FULL=1 (the long run), WRITE_DOCS=1 (fill docs/benchmarks.md), BENCH_ARGS=...
FULL ?=
WRITE_DOCS ?=
BENCH_ARGS ?=
# make demo DEMO_SIZE=500 DEMO_ARGS=--keep
DEMO_SIZE ?= 8000
DEMO_ARGS ?=

.PHONY: help venv test test-unit lint format demo bench docs clean

help:
	@echo "make test   - run the whole test suite (tests/unit, integration, acceptance)"
	@echo "make test-unit - only tests/unit: no database, broker or process needed"
	@echo "make demo   - the HR scenario end to end: a bulk run of 8,000 notifications, a flaky"
	@echo "             mail gateway, dedup, priorities, a killed worker, retry of the failed"
	@echo "             (DEMO_SIZE=500 for a short run, DEMO_ARGS=--keep to leave the admin up)"
	@echo "make lint   - ruff (lint + format check), mypy and the import contracts"
	@echo "make bench  - benchmark the guard against plain Celery (FULL=1 for the full run,"
	@echo "             WRITE_DOCS=1 to put the table into docs/benchmarks.md)"
	@echo "make docs   - build the Sphinx docs"

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "Python 3.10+ is required"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,lint]"
	touch $@

venv: $(BIN)/.installed

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: venv
	DEMO_SIZE=$(DEMO_SIZE) $(BIN)/python example_project/run_demo.py $(DEMO_ARGS)

bench: venv
	$(BIN)/python -m bench $(if $(FULL),--full) $(if $(WRITE_DOCS),--write-docs) $(BENCH_ARGS)

docs: venv
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	$(BIN)/sphinx-build -W -q -b html docs docs/_build/html

clean:
	rm -rf $(VENV) .tox .mypy_cache .ruff_cache .pytest_cache test-artifacts docs/_build
