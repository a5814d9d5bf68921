"""Annotated dependency aliases shared by the routers."""

from collections.abc import Callable, Iterator
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.auth.service import authenticate
from service.config import Settings
from service.contract.limits import MAX_CREDENTIAL, MAX_ID
from service.db import Steps, run_steps, run_steps_on_loop, session_scope
from service.models import Project

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

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


# The busiest routes read their own parameters (FastAPI's handling of them was a fifth to a
# quarter of such a request's CPU), refused as FastAPI refuses them (a 422 naming each), and
# list them in the OpenAPI document by hand (openapi_extra), as FastAPI would have.


def too_long(where: str, name: str, value: str, limit: int) -> RequestValidationError:
    """The 422 FastAPI gives a parameter past its max_length."""
    return RequestValidationError(
        [
            {
                "type": "string_too_long",
                "loc": (where, name),
                "msg": f"String should have at most {limit} characters",
                "input": value,
                "ctx": {"max_length": limit},
            }
        ]
    )


def authorization(request: Request) -> str | None:
    """AuthorizationHeader, read from the request."""
    value = request.headers.get("authorization")
    if value is not None and len(value) > MAX_CREDENTIAL:
        raise too_long("header", "authorization", value, MAX_CREDENTIAL)
    return value


def query(request: Request, model: type[M]) -> M:
    """The query string as `model` (its fields: the route's query parameters), validated as
    FastAPI validates query parameters: the last of a repeated parameter counts, unknown ones
    are ignored."""
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise RequestValidationError(
            [{**error, "loc": ("query", *error["loc"])} for error in errors]
        ) from None


async def answer_steps(
    request: Request, steps: Callable[[], Steps[BaseModel | bytes]], reads_only: bool = False
) -> Response:
    """The answer of `steps()` (work written as the statements it runs: service.db's Steps) as
    JSON (a model, or JSON it wrote itself), for the routes under the heaviest load (reward
    callbacks, run listings):

    - on PostgreSQL, on the event loop, on a connection of the lifespan's asyncpg pool
      (app.state.loop_pool, run_steps_on_loop): the loop runs other
      requests while one waits on the database, and no thread, session or greenlet is
      involved. A plain route instead crosses to the threadpool for the session, each plain
      dependency, the handler, the check of the answer and the commit, and under load each
      crossing, and each of the thread's round trips to the database, waits for the GIL: that
      cost a callback more CPU than all of its own work;
    - on SQLite (whose driver only blocks), in a session committed or rolled back as
      SessionDep's: in one trip to the threadpool or, for `reads_only` steps, on the event loop
      itself. In WAL mode a read never waits for a writer's lock, and reading a page of rows
      from the cache costs less than the trip: from the threadpool, a listing's GIL handoffs
      cost three times the CPU of the same read on the loop.

    `steps` builds the answer from the route's response_model, which still documents it. It
    writes at most one statement, one that is right on its own whatever happened since its
    reads (a version-checked UPDATE): on the event loop each statement commits as it runs
    (autocommit), with no BEGIN and COMMIT round trips."""
    loop_pool = getattr(request.app.state, "loop_pool", None)
    settings: Settings = request.app.state.settings
    if loop_pool is None and reads_only:
        with session_scope(settings.resolved_database_url) as session:
            answer = run_steps(session, steps())
    elif loop_pool is None:
        answer = await in_one_trip(settings, lambda session: run_steps(session, steps()))
    else:
        answer = await run_steps_on_loop(loop_pool, steps())
    return Response(_json(answer), media_type="application/json")


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
