# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench venv clean docs notebooks

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,docs]'
	touch $(STAMP)

venv: $(STAMP)

## FedProx vs FedAvg on Synthetic(1,1) with 90% stragglers (offline): table + plot in runs/demo
demo: $(STAMP)
	$(BIN)/python experiments/demo.py --out runs/demo

## the fast test suite (what CI runs) with the 15 slowest tests; a file per worker, so module fixtures (the
## 4-device subprocess, runs) are built once, and test_conformance.py an algorithm per worker (tests/conftest.py).
## Compiled programs are cached in ~/.cache/fedjax_lab/jax between local runs (FEDJAX_LAB_NO_CACHE=1: off; off under CI)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=15

## the heavier tests, on purpose
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

## the API reference (pdoc) in build/api; fails on a module that does not import or a broken reference
docs: $(STAMP)
	$(BIN)/python -m fedjax_lab.docs.build build/api

## re-execute every notebook at its stored size and store it with its outputs
notebooks: $(STAMP)
	$(BIN)/python notebooks/run_notebooks.py

bench: $(STAMP)
	$(BIN)/python experiments/bench_round.py

clean:
	rm -rf $(VENV) runs .pytest_cache
