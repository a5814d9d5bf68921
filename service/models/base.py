"""Declarative base, id generation and a UTC-aware timestamp type shared by the ORM classes."""

import functools
import secrets
import time
from datetime import UTC, datetime

from sqlalchemy import DateTime, TypeDecorator
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Session


def new_id(prefix: str, sep: str = "_") -> str:
    """Time-ordered ids (ms timestamp then randomness): sorting by id sorts by creation."""
    return f"{prefix}{sep}{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Stores UTC; SQLite drops the zone, so it is put back on the way out."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


def upsert(
    session: Session,
    model,
    rows: list[dict],
    keys: list[str],
    columns: list[str],
    add: bool = False,
) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE columns, on PostgreSQL or SQLite: one statement,
    built and compiled once, executed for every row (SQLAlchemy batches them). `add`: a row
    already there gets the new values added to its own instead of replaced by them."""
    if rows:
        dialect = session.get_bind().dialect.name
        stmt = _upsert_statement(dialect, model.__table__, tuple(keys), tuple(columns), add)
        session.connection().execute(stmt, rows)


@functools.lru_cache(maxsize=64)
def _upsert_statement(
    dialect: str, table, keys: tuple[str, ...], columns: tuple[str, ...], add: bool
):
    stmt = (postgresql if dialect == "postgresql" else sqlite).insert(table)
    new = stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=list(keys),
        set_={c: table.c[c] + new[c] if add else new[c] for c in columns},
    )
