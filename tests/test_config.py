"""Config hygiene: a cluster's secrets come from the environment, and the API refuses to start
outside the embedded stack while they are left to their defaults."""

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from click.testing import CliRunner

from service.auth.service import authenticate, create_api_key
from service.cli import main
from service.config import Settings, get_settings
from service.contract.sealing import SealingError
from service.db import session_scope
from service.errors import Unauthorized
from service.main import UnsafeSettings, create_app

from conftest import CLUSTER_SECRETS

THREADS = 16

PG = "postgresql+psycopg://gvpo@db.internal/gvpo"


@pytest.mark.parametrize(
    "where",
    [{"database_url": PG}, {"broker_url": "redis://redis:6379/0"}],
    ids=["postgres", "redis"],
)
def test_the_api_refuses_a_cluster_with_default_secrets(tmp_path, where):
    settings = Settings(data_dir=tmp_path, **where)
    assert not settings.embedded
    with pytest.raises(UnsafeSettings) as refused:
        create_app(settings)
    message = str(refused.value)
    assert "GVPO_SECRET_KEY is not set" in message and "GVPO_API_KEY_PEPPER is not set" in message
    assert "GVPO_ENCRYPTION_KEY is not set: it encrypts the webhook secrets" in message
    short = settings.model_copy(
        update={"secret_key": "x" * 31, **{"api_key_pepper": CLUSTER_SECRETS["api_key_pepper"]}}
    )
    with pytest.raises(UnsafeSettings, match="GVPO_SECRET_KEY is shorter than 32 characters"):
        create_app(short)
    # every key listed for a key rotation counts
    rotating = {**CLUSTER_SECRETS, "encryption_key": CLUSTER_SECRETS["encryption_key"] + ",old"}
    with pytest.raises(UnsafeSettings, match="GVPO_ENCRYPTION_KEY is shorter than 32 characters"):
        create_app(settings.model_copy(update=rotating))
    create_app(settings.model_copy(update=CLUSTER_SECRETS))  # set: it starts


def test_the_embedded_stack_needs_no_secrets(tmp_path):
    settings = Settings(data_dir=tmp_path)
    assert settings.embedded and settings.unsafe_secrets() == []
    create_app(settings)
    assert len(settings.resolved_secret_key) == 64  # made once, kept under the data dir
    assert settings.resolved_secret_key == Settings(data_dir=tmp_path).resolved_secret_key
    sealed = settings.sealer.seal("whsec_x")  # its own key, also kept under the data dir
    assert Settings(data_dir=tmp_path).sealer.open(sealed) == "whsec_x"
    assert (tmp_path / "encryption_key").read_bytes() != (tmp_path / "secret_key").read_bytes()


@pytest.mark.parametrize("attempt", range(5))
def test_threads_making_the_kept_keys_at_once_all_get_the_first_one(tmp_path, attempt):
    # The API's request threads make the keys on first use: the first submissions to a fresh
    # embedded API all do at once (one of them used to lose its temporary file to another).
    settings = Settings(data_dir=tmp_path)
    start = threading.Barrier(THREADS)

    def keys(_):
        start.wait(timeout=60)
        return settings.resolved_secret_key, settings.sealer.seal("whsec_x")

    with ThreadPoolExecutor(THREADS) as pool:
        made = list(pool.map(keys, range(THREADS)))
    assert {secret for secret, _ in made} == {(tmp_path / "secret_key").read_bytes()}
    reader = Settings(data_dir=tmp_path).sealer
    assert {reader.open(sealed) for _, sealed in made} == {"whsec_x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encryption_key", "secret_key"]


def test_a_cluster_without_an_encryption_key_never_stores_a_secret_in_clear(tmp_path):
    """No key, no default: each replica and worker would make its own. The sealer refuses,
    and so does a worker at start."""
    from workers.worker import run_worker

    cluster = Settings(data_dir=tmp_path, database_url=PG)
    with pytest.raises(SealingError, match="GVPO_ENCRYPTION_KEY is not set"):
        cluster.sealer.seal("whsec_x")
    with pytest.raises(SealingError, match="GVPO_ENCRYPTION_KEY is not set"):
        run_worker(cluster)
    assert not (tmp_path / "encryption_key").exists()


def test_gvpo_api_and_api_key_create_say_what_to_set(tmp_path):
    env = {
        "GVPO_DATA_DIR": str(tmp_path),
        "GVPO_DATABASE_URL": PG,
        "GVPO_SECRET_KEY": "",
        "GVPO_API_KEY_PEPPER": "",
    }
    get_settings.cache_clear()
    try:
        api = CliRunner().invoke(main, ["api"], env=env)
        key = CliRunner().invoke(main, ["api-key", "create", "--project", "p"], env=env)
    finally:
        get_settings.cache_clear()
    assert api.exit_code == 1 and "refusing to serve a cluster with default secrets" in api.output
    assert "GVPO_SECRET_KEY is not set" in api.output and "openssl rand -hex 32" in api.output
    assert key.exit_code == 1 and "GVPO_API_KEY_PEPPER is not set" in key.output


def test_api_keys_are_stored_as_a_peppered_hash(settings):
    pepper = CLUSTER_SECRETS["api_key_pepper"]
    with session_scope(settings.resolved_database_url) as session:
        project, key = create_api_key(session, "peppered", pepper)
    with session_scope(settings.resolved_database_url) as session:
        assert authenticate(session, f"Bearer {key}", pepper).id == project.id
        with pytest.raises(Unauthorized):  # the database alone does not check a key
            authenticate(session, f"Bearer {key}")
        from service.models import ApiKey

        stored = session.query(ApiKey).filter_by(project_id=project.id).one().key_hash
    assert stored != hashlib.sha256(key.encode()).hexdigest()


def test_the_data_folder_and_the_database_file_are_the_owners_alone(tmp_path):
    import stat

    from service.migrate import prepare

    data = tmp_path / "gvpo"
    data.mkdir()
    data.chmod(0o755)  # made earlier, under a looser umask
    settings = Settings(data_dir=data)
    prepare(settings)
    settings.resolved_secret_key  # noqa: B018 (made on first use)
    settings.sealer  # noqa: B018
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    assert mode(data) == 0o700
    assert mode(data / "gvpo.db") == 0o600
    assert mode(data / "secret_key") == 0o600
    assert mode(data / "encryption_key") == 0o600
