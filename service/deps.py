"""Annotated dependency aliases shared by the routers."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from service.auth.service import authenticate
from service.config import Settings
from service.db import session_scope
from service.models import Project

# The largest integer the databases store (SQLite INTEGER, PostgreSQL BIGINT): a larger step or
# cursor in a query would fail in the driver instead of matching nothing.
DB_INT_MAX = 2**63 - 1


def _settings(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(_settings)]


def _session(settings: SettingsDep) -> Iterator[Session]:
    # The request boundary: commit (then run after-commit hooks such as enqueueing) or roll back.
    with session_scope(settings.resolved_database_url) as session:
        yield session


# scope="function": commit before the response is sent, so a 201 means the row is durable.
SessionDep = Annotated[Session, Depends(_session, scope="function")]


def _project(
    session: SessionDep,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header()] = None,
) -> Project:
    return authenticate(session, authorization, settings.api_key_pepper)


ProjectDep = Annotated[Project, Depends(_project)]
