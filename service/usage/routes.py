from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from service.contract.spec import RunSpec
from service.deps import PathId, ProjectDep, SessionDep, SettingsDep
from service.usage import service
from service.usage.schemas import Estimate, RunUsage, UsageReport

router = APIRouter(tags=["usage"])


@router.get("/v1/usage", response_model=UsageReport)
def get_usage(
    session: SessionDep,
    project: ProjectDep,
    settings: SettingsDep,
    group_by: Literal["day", "run"] = "day",
    since: Annotated[date | None, Query(description="first day (UTC) counted")] = None,
    until: Annotated[date | None, Query(description="last day (UTC) counted")] = None,
) -> UsageReport:
    """What the project's runs used, per day or per run: device time (GPU-seconds, or
    process-seconds on CPU workers), tokens generated and trained, webhook calls; with the
    project's quota and the device-hours it has used."""
    return service.usage_report(session, settings, project, group_by, since, until)


@router.get("/v1/runs/{run_id}/usage", response_model=RunUsage)
def get_run_usage(run_id: PathId, session: SessionDep, project: ProjectDep) -> RunUsage:
    """What one run used, in all and per day (every attempt: a resumed run's replayed steps
    were spent again, and count)."""
    return service.run_usage(session, project, run_id)


@router.post("/v1/runs:estimate", response_model=Estimate)
def estimate_run(
    spec: RunSpec, session: SessionDep, project: ProjectDep, settings: SettingsDep
) -> Estimate:
    """A spec's cost before it is submitted: its completions and token bound, its devices, and
    device-hours at the rate the project's ended runs of the same model took; with what is
    left of the budget. A bad spec is a 422, as POST /v1/runs answers it."""
    return service.estimate(session, settings, project, spec)
