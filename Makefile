# fleet: every target builds what it needs from a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fleet demo

lint: $(STAMP)
	$(BIN)/ruff check broker fleet clients tests
	$(BIN)/ruff format --check broker fleet clients tests

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) lint typecheck
	$(BIN)/pytest --json-report --json-report-file=pytest_results.json

unit: $(STAMP)
	$(BIN)/pytest tests/unit

bench: $(STAMP)
	$(BIN)/fleet bench

clean:
	rm -rf $(VENV) .fleet pytest_results.json .mypy_cache .ruff_cache .pytest_cache
