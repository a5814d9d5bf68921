"""Shared fixtures: a fresh migrated database and broker per test, API keys, and an offline
tiny model built once per session.

Two back ends: "sqlite" (SQLite and the file-backed broker, the embedded stack) and "postgres"
(PostgreSQL 15 and Redis 7, what a cluster runs). Tests get "sqlite"; modules marked
`pytest.mark.both_backends` run every test on each, against one PostgreSQL cluster and one Redis
started for the session, with a database cloned from a migrated template per test.
"""

import itertools
import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: small models, few cores

from pathlib import Path

import pytest

from service.auth.service import create_api_key
from service.config import Settings
from service.db import session_scope
from service.migrate import upgrade


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from workers.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


BACKENDS = ("sqlite", "postgres")
TEMPLATE_DB = "gvpo_template"
# What a cluster must set (Settings.unsafe_secrets): 32 characters or more.
CLUSTER_SECRETS = {
    "secret_key": "test-secret-key-" + "s" * 32,
    "api_key_pepper": "test-api-key-pepper-" + "p" * 32,
    "encryption_key": "test-encryption-key-" + "e" * 32,
}
# What the tests' clusters set: those secrets, and a model root (a cluster has none by default)
# where the tests build their models.
CLUSTER = {**CLUSTER_SECRETS, "model_roots": tempfile.gettempdir()}
_databases = itertools.count()


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "both_backends"
    ):
        metafunc.parametrize("backend", BACKENDS, indirect=True)


def pytest_collection_modifyitems(config, items):
    """A test marked one_backend(name) whose back end (a parameter, of `backend` or of a
    fixture parametrised over BACKENDS) is another is deselected: a slow end-to-end test
    whose subject does not depend on the database runs once, where it matters most. The
    report counts them as deselected. Then the files with slow tests go first."""
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("one_backend")
        params = item.callspec.params if hasattr(item, "callspec") else {}
        on = next((v for v in params.values() if isinstance(v, str) and v in BACKENDS), None)
        (drop if marker and on not in (None, marker.args[0]) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    # Files with a slow test first (a stable sort keeps each file's tests together and in
    # order): `make test` hands whole files to its processes in this order
    # (--no-loadscope-reorder), so the longest start early and short files fill the end.
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture
def backend(request) -> str:
    return getattr(request, "param", "sqlite")


@pytest.fixture(scope="session")
def cluster_servers():
    """PostgreSQL (with a migrated template database) and Redis for the whole session; the
    Redis URL is returned with the cluster."""
    import shutil
    import tempfile

    from service.db import get_engine

    from services import Postgres, start_redis

    root = Path(tempfile.mkdtemp(prefix="gvpo-pg-"))
    pg = Postgres(root)
    pg.start()
    try:
        redis, redis_port = start_redis(root)
        try:
            template = pg.create_database(TEMPLATE_DB)
            upgrade(template)
            get_engine(template).dispose()  # a template must have no open connections
            yield pg, f"redis://127.0.0.1:{redis_port}"
        finally:
            redis.terminate()
    finally:
        pg.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def backend_settings(request, backend: str) -> dict:
    """The settings that put a test on `backend`: a fresh database and an empty broker."""
    if backend == "sqlite":
        return {}
    import redis

    pg, redis_url = request.getfixturevalue("cluster_servers")
    redis.Redis.from_url(redis_url).flushall()  # no task or result from an earlier test
    database = pg.create_database(f"test_{next(_databases)}", template=TEMPLATE_DB)
    return {"database_url": database, "broker_url": f"{redis_url}/0", **CLUSTER}


def new_settings(root: Path, backend: str, request) -> Settings:
    """Settings on `backend` with a fresh migrated database under `root` (see `settings`)."""
    # grpc_port=0: no gRPC server in these apps; the gRPC and end-to-end tests turn it on.
    s = Settings(
        data_dir=root / "gvpo",
        heartbeat_seconds=1.0,
        lease_seconds=30.0,
        grpc_port=0,
        **backend_settings(request, backend),
    )
    s.resolved_data_dir.mkdir(parents=True)
    if backend == "sqlite":
        upgrade(s.resolved_database_url)
    return s


def release(settings: Settings) -> None:
    """Close the settings' database connections and drop a PostgreSQL test database (one cluster
    serves every test: dropping each as it ends keeps its disk, and its teardown, small)."""
    url = settings.resolved_database_url
    if not url.startswith("sqlite"):
        from service.db import get_engine

        from services import drop_database

        get_engine(url).dispose()
        drop_database(url)


@pytest.fixture
def settings(tmp_path, backend, request):
    s = new_settings(tmp_path, backend, request)
    yield s
    release(s)


@pytest.fixture
def make_key(settings):
    def make(project: str = "team-a") -> str:
        with session_scope(settings.resolved_database_url) as session:
            return create_api_key(session, project, settings.api_key_pepper)[1]

    return make


@pytest.fixture
def api(settings):
    from fastapi.testclient import TestClient

    from service.main import create_app

    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster (tests/services.py), removed afterwards. Not under
    pytest's tmp_path: that tree is private to this user, and as root the cluster runs as the
    postgres user."""
    import shutil
    import tempfile

    from services import Postgres

    root = Path(tempfile.mkdtemp(prefix="gvpo-pg-"))
    server = Postgres(root)
    server.start()
    yield server
    server.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)
