from typing import Annotated

from fastapi import APIRouter, Query

from service.contract.limits import INT32_MAX, MAX_QUERY_TEXT
from service.deps import PathId, ProjectDep, SessionDep
from service.metrics import service
from service.metrics.schemas import MetricSeries, SampleList, SampleRead

router = APIRouter(prefix="/v1/runs", tags=["metrics"])


@router.get("/{run_id}/metrics", response_model=MetricSeries)
def get_metrics(
    run_id: PathId,
    session: SessionDep,
    project: ProjectDep,
    names: Annotated[
        str | None, Query(max_length=MAX_QUERY_TEXT, description="comma-separated metric names")
    ] = None,
    since_step: Annotated[int | None, Query(ge=0, le=INT32_MAX)] = None,
) -> MetricSeries:
    wanted = [n.strip() for n in names.split(",") if n.strip()] if names else None
    series = service.metric_series(session, project, run_id, wanted, since_step)
    return MetricSeries(run_id=run_id, metrics=series)


@router.get("/{run_id}/samples", response_model=SampleList)
def get_samples(
    run_id: PathId,
    session: SessionDep,
    project: ProjectDep,
    step: Annotated[
        int | None, Query(ge=0, le=INT32_MAX, description="default: the latest step")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
) -> SampleList:
    at, rows = service.list_samples(session, project, run_id, step, limit)
    return SampleList(step=at, data=[SampleRead.model_validate(s) for s in rows])
