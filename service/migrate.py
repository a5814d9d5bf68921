"""Apply and inspect Alembic migrations programmatically (``gvpo db upgrade``)."""

from importlib.resources import files

from alembic import command
from alembic.config import Config

from service.config import Settings


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(files("migrations")))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def prepare(settings: Settings) -> None:
    """Make the data folder and bring the database to the latest schema."""
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
