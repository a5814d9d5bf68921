"""The Alembic migrations build exactly the schema the ORM models describe."""

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from service.migrate import alembic_config, upgrade
from service.models import Base


def test_migrated_schema_matches_models(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                Base.metadata)
    assert diff == []
    assert set(inspect(engine).get_table_names()) >= set(Base.metadata.tables)


def test_downgrade_to_base_and_back(tmp_path):
    from alembic import command

    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    command.downgrade(alembic_config(url), "base")
    assert set(inspect(create_engine(url)).get_table_names()) <= {"alembic_version"}
    upgrade(url)
    assert set(inspect(create_engine(url)).get_table_names()) >= set(Base.metadata.tables)


def test_gvpo_db_upgrade_command(tmp_path):
    from click.testing import CliRunner

    from service.cli import main
    from service.config import get_settings

    get_settings.cache_clear()
    result = CliRunner().invoke(main, ["db", "upgrade"], env={"GVPO_DATA_DIR": str(tmp_path)})
    get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "database at head" in result.output
    assert "runs" in inspect(create_engine(f"sqlite:///{tmp_path / 'gvpo.db'}")).get_table_names()
