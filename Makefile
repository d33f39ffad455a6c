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

## the fast test suite (what CI runs) with the 15 slowest tests, on 2 workers (worksteal: each starts on a
## contiguous half, so a file's module fixtures are mostly built once; tests/conftest.py keeps each algorithm's
## conformance checks together). XLA:CPU's JIT rarely segfaults while compiling (libgcc reads past the end of
## a JIT'd eh_frame that ends on a page boundary; seen about once per full run): the test of a crashed worker
## runs again, up to twice. A failing test is never run again: --only-rerun matches no error text.
## Tests compile at LLVM -O0 (tests/conftest.py). Compiled programs are cached in ~/.cache/fedjax_lab/jax
## between local runs (FEDJAX_LAB_NO_CACHE=1: off; off under CI).
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist worksteal --reruns 2 --only-rerun WORKER_CRASHED_ONLY
test: $(STAMP)
	$(PYTEST) --durations=15

## the heavier tests, on purpose
test-slow: $(STAMP)
	$(PYTEST) -m slow --durations=15

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
