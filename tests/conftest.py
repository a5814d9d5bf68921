"""Shared fixtures: a fresh migrated SQLite database and file broker per test, API keys, and an
offline tiny model built once per session."""

import os

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


@pytest.fixture
def settings(tmp_path) -> Settings:
    # grpc_port=0: no gRPC server in these apps; the gRPC and end-to-end tests pick free ports.
    s = Settings(data_dir=tmp_path / "gvpo", heartbeat_seconds=1.0, lease_seconds=30.0,
                 grpc_port=0)
    s.resolved_data_dir.mkdir(parents=True)
    upgrade(s.resolved_database_url)
    return s


@pytest.fixture
def make_key(settings):
    def make(project: str = "team-a") -> str:
        with session_scope(settings.resolved_database_url) as session:
            return create_api_key(session, project)[1]

    return make


@pytest.fixture
def api(settings):
    from fastapi.testclient import TestClient

    from service.main import create_app

    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster (tests/postgres.py), removed afterwards. Not under
    pytest's tmp_path: that tree is private to this user, and as root the cluster runs as the
    postgres user."""
    import shutil
    import tempfile

    from postgres import Postgres

    root = Path(tempfile.mkdtemp(prefix="gvpo-pg-"))
    server = Postgres(root)
    server.start()
    yield server
    server.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)
