# The two commands a new user needs: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint pytest bench clean help

help:
	@echo "make demo   - create .venv, install qx, run the orders demo on SQLite (QX_DB__URL to change)"
	@echo "make test   - create .venv, install dev extras, run lint, unit and integration tests"
	@echo "make lint   - ruff check, ruff format --check, mypy --strict"
	@echo "make bench  - run the benchmarks against the local PostgreSQL"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "qx needs Python >= 3.11 (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamp files re-run the install when pyproject.toml changes.
$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[cli,sqlite,postgres,brokers,api]'
	@touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@ $(VENV)/.demo-installed

demo: $(VENV)/.demo-installed
	$(BIN)/qx demo

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy --strict src

# pytest exits 5 when it collects no tests; make treats any non-zero exit as failure.
pytest: $(VENV)/.dev-installed
	$(BIN)/python -m pytest tests

test: lint pytest

# Every benchmark in one run; writes bench/RESULTS.md. Needs PostgreSQL and NATS (see README).
bench: $(VENV)/.dev-installed
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis qx.sqlite3*
