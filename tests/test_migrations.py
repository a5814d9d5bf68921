"""The Alembic migrations build exactly the schema the ORM models describe, on SQLite and on
PostgreSQL: from an empty database, from every earlier revision, and back down to nothing."""

import itertools

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, pool, text

from service.config import Settings
from service.contract.sealing import SealingError
from service.migrate import alembic_config, upgrade
from service.models import Base
from service.models.metric import unpack

REVISIONS = [
    r.revision for r in ScriptDirectory.from_config(alembic_config("sqlite://")).walk_revisions()
][::-1]
_names = itertools.count()


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database(request, tmp_path):
    """A URL factory: each call gives a new, empty database on the back end."""
    if request.param == "sqlite":
        return lambda: f"sqlite:///{tmp_path / f'm{next(_names)}.db'}"
    pg, _ = request.getfixturevalue("cluster_servers")
    return lambda: pg.create_database(f"migrations_{next(_names)}")


def schema_diff(url: str) -> list:
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        return compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )


def tables(url: str) -> set[str]:
    return set(inspect(create_engine(url, poolclass=pool.NullPool)).get_table_names())


def test_migrated_schema_matches_models(empty_database):
    url = empty_database()
    upgrade(url)
    assert schema_diff(url) == []
    assert tables(url) >= set(Base.metadata.tables)


@pytest.mark.parametrize("start", REVISIONS[:-1])
def test_upgrade_from_every_earlier_revision(empty_database, start):
    url = empty_database()
    upgrade(url, start)
    upgrade(url)
    assert schema_diff(url) == []


def test_downgrade_to_base_and_back(empty_database):
    url = empty_database()
    upgrade(url)
    for revision in reversed(REVISIONS[:-1]):  # one step at a time: every downgrade runs
        command.downgrade(alembic_config(url), revision)
    command.downgrade(alembic_config(url), "base")
    assert tables(url) <= {"alembic_version"}
    upgrade(url)
    assert schema_diff(url) == []


# Two runs as revision 0009 stored them, webhook secrets in clear: one mid-rotation.
SECRETS_0009 = {
    "run_a": ("whsec_current_secret_of_run_a_0123456789", "whsec_previous_of_run_a_0123456789"),
    "run_b": ("whsec_current_secret_of_run_b_0123456789", None),
}


def runs_at_0009(url: str) -> None:
    upgrade(url, "0009")
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO projects (id, name, created_at) VALUES ('prj_1', 'p', :now)"),
            {"now": "2026-12-01 00:00:00"},
        )
        conn.execute(
            text(
                "INSERT INTO runs (id, project_id, status, spec, webhook_secret, "
                "previous_webhook_secret, step, total_steps, cancel_requested, pause_requested, "
                "tokens_generated, samples_generated, attempts, created_at) VALUES (:id, "
                "'prj_1', 'queued', '{}', :current, :previous, 0, 1, false, false, 0, 0, 0, :now)"
            ),
            [
                {"id": run_id, "current": current, "previous": previous, "now": "2026-12-01"}
                for run_id, (current, previous) in SECRETS_0009.items()
            ],
        )


def stored_secrets(url: str, *columns: str) -> dict[str, tuple]:
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        rows = conn.execute(text(f"SELECT id, {', '.join(columns)} FROM runs")).all()
    return {row[0]: tuple(row[1:]) for row in rows}


def test_0010_encrypts_the_stored_webhook_secrets_and_its_downgrade_decrypts_them(
    empty_database, tmp_path
):
    url = empty_database()
    runs_at_0009(url)
    settings = Settings(data_dir=tmp_path, database_url=url, encryption_key="k" * 32)
    upgrade(url, settings=settings)
    assert schema_diff(url) == []
    encrypted = stored_secrets(url, "webhook_secret_encrypted", "previous_webhook_secret_encrypted")
    for run_id, plain in SECRETS_0009.items():
        sealed = encrypted[run_id]
        assert not any(p and p in s for p, s in zip(plain, sealed, strict=True))
        assert tuple(s and settings.sealer.open(s) for s in sealed) == plain
    command.downgrade(alembic_config(url, settings), "0009")
    assert stored_secrets(url, "webhook_secret", "previous_webhook_secret") == SECRETS_0009


def test_0010_refuses_to_run_without_a_key_where_there_is_no_default(empty_database, tmp_path):
    """A cluster (here: a Redis broker) has no key kept in its data dir: the migration stops,
    saying what to set, and leaves the secrets as they were."""
    url = empty_database()
    runs_at_0009(url)
    cluster = Settings(data_dir=tmp_path, database_url=url, broker_url="redis://redis:6379/0")
    with pytest.raises(SealingError, match="GVPO_ENCRYPTION_KEY is not set"):
        upgrade(url, settings=cluster)
    assert stored_secrets(url, "webhook_secret", "previous_webhook_secret") == SECRETS_0009
    upgrade(url, settings=cluster.model_copy(update={"encryption_key": "k" * 32}))
    assert schema_diff(url) == []


def test_0012_gives_each_recorded_run_the_reward_of_its_last_step(empty_database, tmp_path):
    url = empty_database()
    runs_at_0009(url)
    settings = Settings(data_dir=tmp_path, database_url=url, encryption_key="k" * 32)
    upgrade(url, "0011", settings=settings)
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.begin() as conn:
        conn.execute(text("UPDATE runs SET step = 2 WHERE id = 'run_a'"))
        conn.execute(
            text("INSERT INTO metrics (run_id, name, step, value) VALUES (:run, :name, :step, :v)"),
            [
                {"run": "run_a", "name": "reward/mean", "step": 1, "v": 0.25},
                {"run": "run_a", "name": "reward/mean", "step": 2, "v": 0.5},
                {"run": "run_a", "name": "loss", "step": 2, "v": 3.0},
            ],
        )
    upgrade(url, settings=settings)
    assert stored_secrets(url, "reward") == {"run_a": (0.5,), "run_b": (None,)}


def test_0017_and_0020_build_the_rollups_and_pages_of_the_recorded_metrics(
    empty_database, tmp_path
):
    url = empty_database()
    runs_at_0009(url)
    settings = Settings(data_dir=tmp_path, database_url=url, encryption_key="k" * 32)
    upgrade(url, "0016", settings=settings)
    engine = create_engine(url, poolclass=pool.NullPool)
    values = {step: (step * 7) % 11 - 5.0 for step in range(1, 41)}
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO metrics (run_id, name, step, value) VALUES ('run_a', 'loss', :s, :v)"
            ),
            [{"s": step, "v": v} for step, v in values.items()],
        )
    upgrade(url, settings=settings)
    with engine.begin() as conn:
        rows = conn.execute(
            text(
                "SELECT bucket, count, min_step, min_value, max_step, max_value FROM "
                "metric_rollups WHERE run_id = 'run_a' AND level = 2 ORDER BY bucket"
            )
        ).all()
        pages = conn.execute(
            text(
                "SELECT page, step_data, value_data FROM metric_pages "
                "WHERE run_id = 'run_a' AND level = 2"
            )
        ).all()
    # level 2: buckets of 16 steps (1-15, 16-31, 32-40)
    for bucket, count, low_step, low, high_step, high in rows:
        steps = [s for s in values if s // 16 == bucket]
        assert count == len(steps)
        assert (low, high) == (min(values[s] for s in steps), max(values[s] for s in steps))
        assert values[low_step] == low and values[high_step] == high
    assert [r[0] for r in rows] == [0, 1, 2]
    # 0020: the same extremes, each bucket's in step order, in page 0
    assert [page for page, _, _ in pages] == [0]
    page_steps, page_values = unpack("i", pages[0][1]), unpack("d", pages[0][2])
    packed = [(s, v) for s, v in zip(page_steps, page_values, strict=True) if s >= 0]
    assert packed == [p for r in rows for p in sorted({(r[2], r[3]), (r[4], r[5])})]


def test_gvpo_db_upgrade_command(tmp_path):
    from click.testing import CliRunner

    from service.cli import main
    from service.config import get_settings

    get_settings.cache_clear()
    result = CliRunner().invoke(main, ["db", "upgrade"], env={"GVPO_DATA_DIR": str(tmp_path)})
    get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "database at head" in result.output
    assert "runs" in tables(f"sqlite:///{tmp_path / 'gvpo.db'}")
