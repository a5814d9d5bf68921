from fastapi import APIRouter

from service.deps import ProjectDep, SessionDep, SettingsDep
from service.diagnostics import service
from service.diagnostics.schemas import DryRunRequest, DryRunResult

router = APIRouter(prefix="/v1", tags=["diagnostics"])


@router.post("/gvpo:dry_run", response_model=DryRunResult)
def dry_run(
    body: DryRunRequest, session: SessionDep, settings: SettingsDep, project: ProjectDep
) -> DryRunResult:
    """What one group would teach: each completion's log-ratio against the run's starting model,
    its GVPO weight w_i and the group's loss, under a checkpoint of one of your runs. Nothing
    is trained or stored. A worker on the run's queue computes it: 504 when none answers in
    time (a worker training a run answers once the run has ended), 503 when the broker is
    down."""
    return service.dry_run(session, settings, project, body)
