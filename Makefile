# The two commands a new user needs: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-min test-min-part lint docs pytest bench clean help

help:
	@echo "make demo   - create .venv, install qx, run the orders demo on SQLite (QX_DB__URL to change)"
	@echo "make test   - create .venv, install the dev group, run lint, unit and integration tests"
	@echo "              (and a part of them on the minimum versions, in .venv-min)"
	@echo "make test-min - the tests on the lowest version of every dependency qx declares"
	@echo "make lint   - ruff check, ruff format --check, mypy --strict"
	@echo "make docs   - build the documentation site into site/ (strict: warnings fail)"
	@echo "make bench  - run the benchmarks against the local PostgreSQL"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "qx needs Python >= 3.11 (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamp files re-run the install when pyproject.toml changes.
$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[cli,sqlite,postgres,brokers,api]'
	@touch $@

# Every user extra, and the development groups of pyproject.toml (not published as extras).
EXTRAS := postgres,sqlite,cli,brokers,metrics,otel,api,testing

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]' --group dev
	@touch $@ $(VENV)/.demo-installed

demo: $(VENV)/.demo-installed
	$(BIN)/qx demo

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests bench examples scripts migrations
	$(BIN)/ruff format --check src tests bench examples scripts migrations
	$(BIN)/mypy --strict src

# The site, strict (mkdocs.yml): a broken link or anchor, a page left out of the navigation,
# or a docstring the API reference cannot read fails the build.
docs: $(VENV)/.dev-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# pytest exits 5 when it collects no tests; make treats any non-zero exit as failure.
# Two processes, a test file each at a time (its module fixtures - a broker, a cluster - stay
# in one): the longest tests wait on purpose (outages, idleness, a broker stopped), so a
# second process runs the others meanwhile - on two cores the suite takes about half as long
# (697 s -> 345 s). Each test has its own schema, database file, broker names and ports.
TEST_WORKERS ?= 2

pytest: $(VENV)/.dev-installed
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile

# The site is built strict by tests/integration/test_docs_site.py (a broken link, a page left
# out, a public name undocumented): `make docs` is for reading it, not a second build here.
test: lint pytest test-min-part

# The declared minimums are claims: a second environment resolves every direct dependency
# (core and extras) to the lowest version pyproject.toml allows and runs the same tests.
MIN_VENV := .venv-min

$(MIN_VENV)/.installed: pyproject.toml scripts/minimum_versions.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "qx needs Python >= 3.11 (set PYTHON=python3.11)")'
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MIN_VENV)/bin/python scripts/minimum_versions.py > $(MIN_VENV)/constraints.txt
	$(MIN_VENV)/bin/python -m pip install --quiet -c $(MIN_VENV)/constraints.txt -e '.[$(EXTRAS)]' --group test
	@touch $@

test-min: $(MIN_VENV)/.installed
	$(MIN_VENV)/bin/python scripts/minimum_versions.py --check
	$(MIN_VENV)/bin/python -m pytest tests

# The part of it every `make test` (and so CI) runs: the unit tests, and what a new user
# meets first - migrations, the README, the CLI's errors, packaging, tracing.
MIN_PART := tests/unit tests/integration/test_migrations.py tests/integration/test_newcomer.py \
	tests/integration/test_telemetry.py tests/integration/test_packaging.py \
	tests/integration/test_demo_and_readme.py

test-min-part: $(MIN_VENV)/.installed
	$(MIN_VENV)/bin/python scripts/minimum_versions.py --check
	$(MIN_VENV)/bin/python -m pytest $(MIN_PART)

# Every benchmark in one run; writes bench/RESULTS.md. Needs PostgreSQL and NATS (see README).
bench: $(VENV)/.dev-installed
	$(BIN)/python -m pip install --quiet --group bench
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) $(MIN_VENV) site .mypy_cache .ruff_cache .pytest_cache .hypothesis qx.sqlite3*
