from fastapi import APIRouter

from service.deps import ProjectDep, SessionDep, SettingsDep
from service.graders import service
from service.graders.schemas import (
    GraderRunRequest,
    GraderRunResponse,
    GraderValidateRequest,
    GraderValidateResponse,
)

router = APIRouter(prefix="/v1", tags=["graders"])


@router.post("/graders:validate", response_model=GraderValidateResponse)
@router.post("/fine_tuning/alpha/graders/validate", response_model=GraderValidateResponse)
def validate(
    body: GraderValidateRequest, session: SessionDep, settings: SettingsDep, project: ProjectDep
) -> GraderValidateResponse:
    """Check a grader as a run would: its fields, templates (only `item` and `sample`) and
    formula, and that the URLs it would call may be called (422 naming each problem), and
    that the models of ours it names are this project's (404). The answer is the grader with
    its defaults filled in."""
    return service.validate(session, settings, project, body)


@router.post("/graders:run", response_model=GraderRunResponse)
@router.post("/fine_tuning/alpha/graders/run", response_model=GraderRunResponse)
def run(
    body: GraderRunRequest, session: SessionDep, settings: SettingsDep, project: ProjectDep
) -> GraderRunResponse:
    """Grade one sample (`model_sample`, with the dataset row `item`) as a run would, in
    OpenAI's answer: the reward, and what went wrong in `metadata.errors` (a judge that
    cannot be reached is model_grader_server_error there, not a failed request). A worker
    grades it: 504 when none answers in time (a worker training a run answers once the run
    has ended), 503 when the broker is down."""
    return service.run(session, settings, project, body)
