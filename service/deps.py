"""Annotated dependency aliases shared by the routers."""

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Header, Path, Request, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.auth.service import authenticate
from service.config import Settings
from service.contract.limits import MAX_CREDENTIAL, MAX_ID
from service.db import session_scope
from service.models import Project

# An id in a path: one longer than any the service makes is refused (422) before any lookup.
PathId = Annotated[str, Path(max_length=MAX_ID)]
# An API key ("Bearer gvpo_sk_..."): hashed and compared, never stored.
AuthorizationHeader = Annotated[str | None, Header(max_length=MAX_CREDENTIAL)]


async def _settings(request: Request) -> Settings:  # async: no trip to the threadpool
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
    authorization: AuthorizationHeader = None,
) -> Project:
    return authenticate(session, authorization, settings.api_key_pepper)


ProjectDep = Annotated[Project, Depends(_project)]


async def _recent_project(request: Request, authorization: AuthorizationHeader = None) -> Project:
    # The inference routes': the key checked within the last seconds is not looked up again
    # (service/serving/lookups.py), and no session is opened for it.
    return await request.app.state.lookups.project(authorization)


RecentProjectDep = Annotated[Project, Depends(_recent_project)]


async def answer_in_session(settings: Settings, work: Callable[[Session], BaseModel]) -> Response:
    """`work(session)`, answered as JSON, in one trip to the threadpool: the session opened,
    committed or rolled back there (session_scope, as SessionDep), and the answer serialised
    there. For the routes under the heaviest load (reward callbacks, run listings): with
    SessionDep, a plain route crosses to the threadpool for the session, for each plain
    dependency, for the handler, for FastAPI's check of the answer against response_model and
    for the commit, and under load each crossing waits for the GIL. `work` builds the answer
    from the route's response_model, which still documents it."""

    def unit() -> bytes:
        with session_scope(settings.resolved_database_url) as session:
            answer = work(session)
        return answer.model_dump_json().encode()

    return Response(await run_in_threadpool(unit), media_type="application/json")
