from fastapi import APIRouter

from service.deps import PathId, ProjectDep, SessionDep, SettingsDep
from service.rescores import service
from service.rescores.schemas import RescoreCreate, RescoreList, RescoreRead

router = APIRouter(prefix="/v1/runs", tags=["rescores"])


@router.post("/{run_id}/rescore", status_code=202, response_model=RescoreRead)
def create_rescore(
    run_id: PathId,
    body: RescoreCreate,
    session: SessionDep,
    project: ProjectDep,
    settings: SettingsDep,
) -> RescoreRead:
    """Score an ended run's stored samples again with a new reward. A worker does it: follow
    /rescores/{id} (progress in samples_scored); each sample's old reward stays in its
    reward_history, and the re-scored groups become a file of purpose offpolicy."""
    return RescoreRead.model_validate(
        service.create_rescore(session, settings, project, run_id, body)
    )


@router.get("/{run_id}/rescores", response_model=RescoreList)
def list_rescores(run_id: PathId, session: SessionDep, project: ProjectDep) -> RescoreList:
    return RescoreList(
        data=[
            RescoreRead.model_validate(r) for r in service.list_rescores(session, project, run_id)
        ]
    )


@router.get("/{run_id}/rescores/{rescore_id}", response_model=RescoreRead)
def get_rescore(
    run_id: PathId, rescore_id: PathId, session: SessionDep, project: ProjectDep
) -> RescoreRead:
    return RescoreRead.model_validate(service.get_rescore(session, project, run_id, rescore_id))
