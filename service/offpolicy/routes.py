from fastapi import APIRouter

from service.deps import PathId, ProjectDep, SessionDep, SettingsDep
from service.offpolicy import service
from service.offpolicy.schemas import GroupsPost, GroupsStatus

router = APIRouter(prefix="/v1/runs", tags=["runs"])


@router.post("/{run_id}/groups", status_code=202, response_model=GroupsStatus)
def post_groups(
    run_id: PathId,
    body: GroupsPost,
    session: SessionDep,
    project: ProjectDep,
    settings: SettingsDep,
) -> GroupsStatus:
    """Add groups of completions made elsewhere to a queued, running or paused run: its next
    steps train them in their off-policy slots, oldest first, before its offpolicy file."""
    return service.post_groups(session, settings, project, run_id, body.groups)


@router.get("/{run_id}/groups", response_model=GroupsStatus)
def groups_status(run_id: PathId, session: SessionDep, project: ProjectDep) -> GroupsStatus:
    """How many posted groups wait, and how many steps have taken."""
    return service.groups_status(session, project, run_id)
