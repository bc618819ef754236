# Two commands matter: `make serve` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: serve test lint imports pytest browser load-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever pyproject.toml changes; the stamp records the extra installed.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev,ray]'
	touch $@ $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/vqa serve --host $(HOST) --port $(PORT)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check service tests
	$(BIN)/ruff format --check service tests

imports: $(VENV)/.installed-dev
	$(BIN)/lint-imports

# The page's end-to-end test drives Debian's chromium (never a downloaded browser).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

pytest: $(VENV)/.installed-dev browser
	$(BIN)/pytest

test: lint imports pytest

# The 60 s sustained-load soak (concurrency 64); `make test` runs a 15 s one.
load-test: $(VENV)/.installed-dev
	$(BIN)/pytest -m load tests/api/test_load.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .import_linter_cache
