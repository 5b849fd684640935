# Tether: `make run` (install + start with embedded defaults), `make test` (install + whole suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test lint bench hardening install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(BIN)/tether serve

test: $(STAMP)
	$(BIN)/ruff check src tests bench hardening
	$(BIN)/mypy
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench hardening
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench

hardening: $(STAMP)
	$(BIN)/pytest -q -m slow
	$(BIN)/python -m hardening

clean:
	rm -rf $(VENV) .tether
