# Two commands do everything on a fresh machine with nothing but Python:
#   make quickstart   set up (the runtime dependencies only), then train a small model end to end on the
#                     built-in data
#   make test         set up (plus what the tests need: transformers, onnx, ...), then run the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
DEV := $(VENV)/.installed-dev

.PHONY: setup setup-dev quickstart test test-slow lint clean

$(RUNTIME): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e .
	touch $(RUNTIME)

$(DEV): $(RUNTIME)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(DEV)

setup: $(RUNTIME)

setup-dev: $(DEV)

quickstart: setup
	$(BIN)/minillm quickstart

test: setup-dev
	$(BIN)/python -m pytest -q

test-slow: setup-dev
	$(BIN)/python -m pytest -q -m slow

lint: setup-dev
	$(BIN)/ruff check src tests

# Build and cache files only: trained models under runs/ are never deleted.
clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
