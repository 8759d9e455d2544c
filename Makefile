# The two commands: `make serve` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test lint typecheck pytest clean relink

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e . --config-settings editable_mode=strict
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=strict
	touch $@ $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/rawcast serve --host $(HOST) --port $(PORT)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The strict editable install links each file: relink so that new modules are seen.
relink: $(VENV)/.installed-dev
	$(BIN)/pip install -q --no-deps -e . --config-settings editable_mode=strict

typecheck: relink
	$(BIN)/mypy

pytest: relink
	PYTHONASYNCIODEBUG=1 PYTHONSAFEPATH=1 $(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .pytest_cache .ruff_cache
