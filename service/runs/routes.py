from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from service.contract.limits import (
    INT32_MAX,
    MAX_CREDENTIAL,
    MAX_ID,
    MAX_IDEMPOTENCY_KEY,
    MAX_RUNS_PAGE,
)
from service.contract.spec import RunSpec
from service.contract.states import RunStatus
from service.db import Steps
from service.deps import (
    PathId,
    ProjectDep,
    SessionDep,
    SettingsDep,
    answer_steps,
    authorization,
    query,
)
from service.runs import control, service, stream
from service.runs.schemas import (
    EventList,
    EventRead,
    RunCreated,
    RunList,
    RunRead,
    RunStates,
    run_list_json,
)

router = APIRouter(prefix="/v1/runs", tags=["runs"])
states_router = APIRouter(tags=["runs"])


@states_router.get("/v1/run-states", response_model=RunStates)
def run_states() -> RunStates:
    """The states a run can be in, which ones are final, how they follow each other and in
    which ones cancel, pause and resume are allowed. Needs no API key."""
    return RunStates.of_contract()


@router.post("", status_code=201, response_model=RunCreated)
def create_run(
    spec: RunSpec,
    response: Response,
    session: SessionDep,
    project: ProjectDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=MAX_IDEMPOTENCY_KEY)] = None,
) -> RunCreated:
    """Create a run. The response carries the run's webhook_secret, once; replays of the same
    Idempotency-Key with the same body return the same run (200, webhook_secret null)."""
    run, secret = service.create_run(session, settings, project, spec, idempotency_key)
    if secret is None:  # the secret is shown once; rotate it if it was lost
        response.status_code = 200
    return RunCreated(**RunRead.model_validate(run).model_dump(), webhook_secret=secret)


class _Page(BaseModel):
    """GET /v1/runs's query parameters (the route reads them itself: deps.query)."""

    status: RunStatus | None = None
    limit: int = Field(20, ge=1, le=MAX_RUNS_PAGE)
    after: str | None = Field(None, max_length=MAX_ID)


_CURSOR = "cursor: the last run id of the previous page"
# _Page's fields and the Authorization header, as FastAPI would document them
PAGE_PARAMETERS = [
    {
        "name": "status",
        "in": "query",
        "required": False,
        "schema": {
            "anyOf": [{"$ref": "#/components/schemas/RunStatus"}, {"type": "null"}],
            "title": "Status",
        },
    },
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {
            "type": "integer",
            "maximum": MAX_RUNS_PAGE,
            "minimum": 1,
            "default": 20,
            "title": "Limit",
        },
    },
    {
        "name": "after",
        "in": "query",
        "required": False,
        "schema": {
            "anyOf": [{"type": "string", "maxLength": MAX_ID}, {"type": "null"}],
            "description": _CURSOR,
            "title": "After",
        },
        "description": _CURSOR,
    },
    {
        "name": "authorization",
        "in": "header",
        "required": False,
        "schema": {
            "anyOf": [{"type": "string", "maxLength": MAX_CREDENTIAL}, {"type": "null"}],
            "title": "Authorization",
        },
    },
]


@router.get("", response_model=RunList, openapi_extra={"parameters": PAGE_PARAMETERS})
async def list_runs(request: Request) -> Response:
    # The key as the inference routes check it (one checked in the last seconds is not looked
    # up again), then the page read and its answer written in one unit (answer_steps).
    page = query(request, _Page)
    project = await request.app.state.lookups.project(authorization(request))

    def steps() -> Steps[bytes]:
        rows, has_more = yield from service.page_steps(
            project, page.status, page.limit, page.after, spec_as_text=True
        )
        return run_list_json(rows, has_more)

    return await answer_steps(request, steps, reads_only=True)


@router.get("/{run_id}", response_model=RunRead)
def get_run(run_id: PathId, session: SessionDep, project: ProjectDep) -> RunRead:
    return RunRead.model_validate(service.get_run(session, project, run_id))


@router.post("/{run_id}/cancel", response_model=RunRead)
def cancel_run(run_id: PathId, session: SessionDep, project: ProjectDep) -> RunRead:
    return RunRead.model_validate(control.cancel_run(session, project, run_id))


@router.post("/{run_id}/pause", response_model=RunRead)
def pause_run(run_id: PathId, session: SessionDep, project: ProjectDep) -> RunRead:
    return RunRead.model_validate(control.pause_run(session, project, run_id))


@router.post("/{run_id}/resume", response_model=RunRead)
def resume_run(
    run_id: PathId, session: SessionDep, settings: SettingsDep, project: ProjectDep
) -> RunRead:
    return RunRead.model_validate(control.resume_run(session, settings, project, run_id))


@router.get(
    "/{run_id}/events/stream",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "Server-Sent Events: one per run event",
        }
    },
)
def stream_events(
    run_id: PathId,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    project: ProjectDep,
    last_event_id: Annotated[int | None, Header(ge=0, le=INT32_MAX)] = None,
    after: Annotated[int | None, Query(ge=0, le=INT32_MAX)] = None,
    metrics: Annotated[
        bool,
        Query(
            description="also send `run` (its state, when status or step changes) and `metrics` "
            "(each step's) messages"
        ),
    ] = False,
    since_step: Annotated[
        int, Query(ge=0, le=INT32_MAX, description="with metrics: only steps after this one")
    ] = 0,
) -> StreamingResponse:
    """The run's events as Server-Sent Events until the run ends. Reconnect with
    `Last-Event-ID` (or `?after=`) to continue after the last event received."""
    service.get_run(session, project, run_id)  # 404 for another project's run
    start = last_event_id if last_event_id is not None else after or 0
    return StreamingResponse(
        stream.event_stream(
            settings, run_id, start, since_step if metrics else None, request.is_disconnected
        ),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


@router.get("/{run_id}/events", response_model=EventList)
def list_events(
    run_id: PathId,
    session: SessionDep,
    project: ProjectDep,
    after: Annotated[int | None, Query(ge=0, le=INT32_MAX)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventList:
    rows, has_more = service.list_events(session, project, run_id, after, limit)
    return EventList(data=[EventRead.model_validate(e) for e in rows], has_more=has_more)
