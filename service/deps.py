"""Annotated dependency aliases shared by the routers."""

from collections.abc import Callable, Iterator
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Path, Request, Response
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.auth.service import authenticate
from service.config import Settings
from service.contract.limits import MAX_CREDENTIAL, MAX_ID
from service.db import commit, session_scope
from service.models import Project

T = TypeVar("T")

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


async def answer_in_session(
    request: Request, work: Callable[[Session], BaseModel | bytes]
) -> Response:
    """`work(session)`, answered as JSON (a model, or JSON it wrote itself), for the routes under
    the heaviest load (reward callbacks, run listings). The session is opened, committed or
    rolled back as SessionDep's (session_scope), and the answer serialised, in one unit:

    - on PostgreSQL, on the event loop, over the lifespan's engine of async connections
      (app.state.loop_engine): the loop runs other requests while one waits on the database,
      and no thread is involved. A plain route instead crosses to the threadpool for the
      session, each plain dependency, the handler, the check of the answer and the commit, and
      under load each crossing, and each of the thread's round trips to the database, waits
      for the GIL: that cost a callback more CPU than all of its own work;
    - on SQLite (whose driver only blocks), in one trip to the threadpool.

    `work` builds the answer from the route's response_model, which still documents it. It
    writes at most one statement, one that is right on its own whatever happened since its
    reads (a version-checked UPDATE): on the event loop each statement commits as it runs
    (autocommit), with no BEGIN and COMMIT round trips."""
    settings: Settings = request.app.state.settings
    engine = getattr(request.app.state, "loop_engine", None)

    def answered(session: Session) -> tuple[bytes, list[Callable[[], None]]]:
        answer = work(session)
        return _json(answer), commit(session)

    if engine is None:
        body = _json(await in_one_trip(settings, work))
        return Response(body, media_type="application/json")
    async with AsyncSession(engine, expire_on_commit=False) as session:
        body, hooks = await session.run_sync(answered)
    for hook in hooks:  # after the commit, as session_scope's (they may block)
        await run_in_threadpool(hook)
    return Response(body, media_type="application/json")


async def in_one_trip(settings: Settings, work: Callable[[Session], T]) -> T:
    """`work(session)` in one trip to the threadpool, in a session opened, committed or rolled
    back there as SessionDep's (session_scope). For routes whose work computes long (a chart's
    thousands of points), which on the event loop would hold up every other request: a plain
    route with SessionDep and ProjectDep crosses to the threadpool five times instead."""

    def unit() -> T:
        with session_scope(settings.resolved_database_url) as session:
            return work(session)

    return await run_in_threadpool(unit)


def _json(answer: BaseModel | bytes) -> bytes:
    return answer if isinstance(answer, bytes) else answer.model_dump_json().encode()
