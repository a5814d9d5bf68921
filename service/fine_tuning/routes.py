"""OpenAI's fine-tuning job routes, at the paths its SDK calls under base_url .../v1."""

from typing import Annotated

from fastapi import APIRouter, Query, Request

from service.contract.limits import INT32_MAX, MAX_ID, MAX_RUNS_PAGE
from service.deps import PathId, ProjectDep, SessionDep, SettingsDep
from service.fine_tuning import creation, service
from service.fine_tuning.schemas import (
    JobCheckpointList,
    JobCreate,
    JobEventList,
    JobList,
    JobRead,
)

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning jobs"])

MAX_EVENTS_PAGE = 1000
EVENT_ID = rf"^{service.EVENT_PREFIX}[0-9]{{1,{len(str(INT32_MAX))}}}$"
METADATA = ("metadata[", "]")


def _metadata_filter(request: Request) -> dict[str, str] | None:
    """OpenAI's `metadata[key]=value` query parameters ({}: no filter); `metadata=null`: jobs
    without metadata."""
    params = request.query_params
    if params.get("metadata") == "null":
        return None
    start, end = METADATA
    return {
        key[len(start) : -len(end)]: value
        for key, value in params.multi_items()
        if key.startswith(start) and key.endswith(end)
    }


@router.post("", response_model=JobRead)
def create_job(
    body: JobCreate, session: SessionDep, project: ProjectDep, settings: SettingsDep
) -> JobRead:
    """Create a job: a GVPO run of the reinforcement method's grader over the training file
    (docs/fine-tuning.md maps each field). 200, as OpenAI answers."""
    return creation.create_job(session, settings, project, body)


@router.get("", response_model=JobList)
def list_jobs(
    request: Request,
    session: SessionDep,
    project: ProjectDep,
    after: Annotated[
        str | None, Query(max_length=MAX_ID, description="the last job id of the page before")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_RUNS_PAGE)] = 20,
) -> JobList:
    """Newest first. Filter with `metadata[key]=value` (each pair must match), or
    `metadata=null` for jobs without metadata."""
    return service.list_jobs(session, project, after, limit, _metadata_filter(request))


@router.get("/{fine_tuning_job_id}", response_model=JobRead)
def get_job(fine_tuning_job_id: PathId, session: SessionDep, project: ProjectDep) -> JobRead:
    return service.read_job(session, project, fine_tuning_job_id)


@router.post("/{fine_tuning_job_id}/cancel", response_model=JobRead)
def cancel_job(fine_tuning_job_id: PathId, session: SessionDep, project: ProjectDep) -> JobRead:
    """A queued or paused job ends cancelled at once; a running one after its current step."""
    return service.cancel_job(session, project, fine_tuning_job_id)


@router.post("/{fine_tuning_job_id}/pause", response_model=JobRead)
def pause_job(fine_tuning_job_id: PathId, session: SessionDep, project: ProjectDep) -> JobRead:
    """A queued job is paused at once; a running one is `pausing` until its run has written a
    checkpoint after its current step."""
    return service.pause_job(session, project, fine_tuning_job_id)


@router.post("/{fine_tuning_job_id}/resume", response_model=JobRead)
def resume_job(
    fine_tuning_job_id: PathId, session: SessionDep, settings: SettingsDep, project: ProjectDep
) -> JobRead:
    """A paused job is queued again and goes on from its last checkpoint."""
    return service.resume_job(session, settings, project, fine_tuning_job_id)


@router.get("/{fine_tuning_job_id}/events", response_model=JobEventList)
def list_events(
    fine_tuning_job_id: PathId,
    session: SessionDep,
    project: ProjectDep,
    after: Annotated[
        str | None,
        Query(
            pattern=EVENT_ID, max_length=MAX_ID, description="the last event id of the page before"
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_EVENTS_PAGE)] = 20,
) -> JobEventList:
    """The run's events, newest first."""
    return service.list_events(session, project, fine_tuning_job_id, after, limit)


@router.get("/{fine_tuning_job_id}/checkpoints", response_model=JobCheckpointList)
def list_checkpoints(
    fine_tuning_job_id: PathId,
    session: SessionDep,
    project: ProjectDep,
    after: Annotated[
        str | None,
        Query(max_length=MAX_ID, description="the last checkpoint id of the page before"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_EVENTS_PAGE)] = 10,
) -> JobCheckpointList:
    """The run's checkpoints that checkpoint.keep_last kept, newest first, with the metrics of
    their steps."""
    return service.list_checkpoints(session, project, fine_tuning_job_id, after, limit)
