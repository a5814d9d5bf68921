# syntax=docker/dockerfile:1
# The API image: `gvpo api` (REST on 8000, gRPC on 50051), and the admin commands
# (`gvpo db upgrade`, `gvpo api-key create`). It loads no model (workers answer the requests
# that need one), so it has no torch, transformers or vLLM: the package without extras.
# Build from the repository root: docker build -f docker/api.Dockerfile -t gvpo-api .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, in their own layer, so that a code change does not download them again.
# The README only has to exist here: pyproject.toml names it.
COPY pyproject.toml constraints.txt ./
RUN touch README.md \
 && pip install -c constraints.txt '.[s3]' \
 && pip uninstall --yes gvpo-service
COPY README.md ./
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
COPY proto ./proto
COPY client ./client
RUN pip install --no-deps -c constraints.txt . \
 && python -c "import importlib.util as u, service.main, migrations, gvpo.v1; assert not any(u.find_spec(m) for m in ('torch', 'transformers', 'vllm')), 'a model library in the API image'"

FROM ${PYTHON_IMAGE}
# A fixed uid, the same in the worker image: both write the shared data volume.
RUN groupadd --gid 10001 gvpo \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/gvpo --shell /usr/sbin/nologin gvpo \
 && mkdir -p /data /models /app \
 && chown gvpo:gvpo /data /models /app
COPY --from=build /opt/venv /opt/venv
# Counting prompt tokens at submission is the only compute here: one thread each is plenty.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1 \
    HF_HOME=/models/huggingface \
    GVPO_DATA_DIR=/data \
    GVPO_API_HOST=0.0.0.0 \
    GVPO_API_PORT=8000 \
    GVPO_GRPC_PORT=50051
WORKDIR /app
USER 10001:10001
EXPOSE 8000 50051
# Liveness only (/healthz): /readyz also checks the database and the broker, and a Redis restart
# should not mark every replica unhealthy at once. The slim image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GVPO_API_PORT', '8000'), timeout=4)"]
CMD ["gvpo", "api"]
