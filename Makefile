# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

# torch is pinned first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,postgres,tables]'
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

test: setup lint
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python examples/demo.py

bench: setup
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) var .pytest_cache
