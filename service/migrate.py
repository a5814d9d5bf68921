"""Apply and inspect Alembic migrations programmatically (``gvpo db upgrade``)."""

from importlib.resources import files
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

from service.config import Settings


def alembic_config(url: str, settings: Settings | None = None) -> Config:
    """Migrations of the database at `url`; those that encrypt stored secrets take the key from
    `settings` (default: the GVPO_* environment)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(files("migrations")))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["settings"] = settings
    return cfg


def upgrade(url: str, revision: str = "head", settings: Settings | None = None) -> None:
    command.upgrade(alembic_config(url, settings), revision)


def prepare(settings: Settings) -> None:
    """Make the data folder and bring the database to the latest schema. The folder holds the
    uploads, checkpoints, the signing key and (with SQLite) the database with its webhook
    secrets: only its owner may enter it, and the database file is the owner's alone."""
    data = settings.resolved_data_dir
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    data.chmod(0o700)  # one made before, or by a looser umask
    upgrade(settings.resolved_database_url, settings=settings)
    url = make_url(settings.resolved_database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        Path(url.database).chmod(0o600)
