# Quick start: `make demo` (the main job) and `make test` (the whole suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Small models on 2 cores run 10-40x faster single-threaded.
export OMP_NUM_THREADS ?= 1

.PHONY: demo test bench install install-dev install-gpu services clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# A GPU worker: the same pins, except torch comes as PyPI's CUDA build instead of the CPU wheel.
install-gpu: $(BIN)/python
	grep -v '^torch==' constraints.txt > $(VENV)/constraints-gpu.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -c $(VENV)/constraints-gpu.txt -e '.[gpu]'

demo: install
	$(BIN)/gvpo demo

# Redis (for the redis:// broker tests) is installed here when missing.
services:
	bash .ci/ensure-services

test: install-dev services
	$(BIN)/python -m pytest

# The learner against TRL's GRPOTrainer, side by side (a separate venv keeps TRL out of .venv).
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[bench]'
	touch $@

bench: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python bench/learner.py --threads 1

clean:
	rm -rf $(VENV) $(BENCH_VENV) .gvpo
