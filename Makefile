# `make demo`: set up .venv and run every experiment on the tiny offline models on CPU (results and PNGs
# under demo/). `make test`: set up .venv and run the tests. Both work on a fresh clone, offline apart
# from PyPI.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(wildcard */__init__.py)   # a new package: reinstall
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	PYTHON=$(BIN)/python bash scripts/demo.sh

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf demo .cache
