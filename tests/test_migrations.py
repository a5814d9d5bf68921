"""The Alembic migrations build exactly the schema the ORM models describe, on SQLite and on
PostgreSQL: from an empty database, from every earlier revision, and back down to nothing."""

import itertools

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, pool

from service.migrate import alembic_config, upgrade
from service.models import Base

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
