# Two commands do everything on a fresh machine with nothing but Python:
#   make quickstart   set up, then train a small model end to end on the built-in data
#   make test         set up, then run the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test test-slow lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	$(BIN)/minillm quickstart

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info .pytest_cache
