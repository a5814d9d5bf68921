import csv
import io
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from pydantic_core import to_json
from sqlalchemy.orm import Session

from service.auth.service import authenticate
from service.contract.limits import INT32_MAX, MAX_QUERY_TEXT
from service.deps import (
    AuthorizationHeader,
    PathId,
    ProjectDep,
    SessionDep,
    SettingsDep,
    in_one_trip,
)
from service.metrics import service
from service.metrics.schemas import MetricNameList, MetricSeries, SampleList, SampleRead

MIN_POINTS, MAX_POINTS = 16, 100_000

router = APIRouter(prefix="/v1/runs", tags=["metrics"])


@router.get(
    "/{run_id}/metrics",
    response_model=MetricSeries,
    responses={200: {"content": {"text/csv": {}}, "description": "JSON, or CSV with format=csv"}},
)
async def get_metrics(
    run_id: PathId,
    settings: SettingsDep,
    authorization: AuthorizationHeader = None,
    names: Annotated[
        str | None, Query(max_length=MAX_QUERY_TEXT, description="comma-separated metric names")
    ] = None,
    since_step: Annotated[int | None, Query(ge=0, le=INT32_MAX)] = None,
    max_points: Annotated[
        int | None,
        Query(
            ge=MIN_POINTS,
            le=MAX_POINTS,
            description="at most this many points per series: a longer series gives each run "
            "of steps' lowest and highest point (listed in `downsampled`)",
        ),
    ] = None,
    with_time: Annotated[
        bool, Query(description="points as [step, value, time] (unix seconds recorded)")
    ] = False,
    format: Annotated[
        Literal["json", "csv"], Query(description="csv: rows of name,step,value,time")
    ] = "json",
) -> Response:
    wanted = [n.strip() for n in names.split(",") if n.strip()] if names else None
    csv_wanted = format == "csv"

    def answer(session: Session) -> Response:  # the key checked and the answer written there
        project = authenticate(session, authorization, settings.api_key_pepper)
        series, downsampled = service.metric_series(
            session, project, run_id, wanted, since_step, max_points, with_time or csv_wanted
        )
        if csv_wanted:
            return Response(_csv(series), media_type="text/csv; charset=utf-8")
        # MetricSeries, written straight from the database's rows: nothing to validate
        body = {"run_id": run_id, "metrics": series, "downsampled": downsampled}
        return Response(to_json(body), media_type="application/json")

    return await in_one_trip(settings, answer)


def _csv(series: dict[str, list]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["name", "step", "value", "time"])
    for name, points in series.items():
        writer.writerows([name, *point] for point in points)
    return out.getvalue()


@router.get("/{run_id}/metrics/names", response_model=MetricNameList)
def get_metric_names(run_id: PathId, session: SessionDep, project: ProjectDep) -> MetricNameList:
    """Every series the run has recorded, with how many values and over which steps."""
    return MetricNameList(data=service.metric_names(session, project, run_id))


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
