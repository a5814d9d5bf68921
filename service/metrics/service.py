"""Reading a run's metric series and samples (the worker writes them as upserts by step)."""

from collections import defaultdict

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from service.metrics.schemas import StepMetrics
from service.models import Metric, Project, Sample
from service.runs.service import get_run


def metric_series(
    session: Session,
    project: Project,
    run_id: str,
    names: list[str] | None,
    since_step: int | None,
) -> dict[str, list[tuple[int, float]]]:
    get_run(session, project, run_id)
    stmt = select(Metric.name, Metric.step, Metric.value).where(Metric.run_id == run_id)
    if names:
        stmt = stmt.where(Metric.name.in_(names))
    if since_step is not None:
        stmt = stmt.where(Metric.step >= since_step)
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for name, step, value in session.execute(stmt.order_by(Metric.name, Metric.step)):
        series[name].append((step, value))
    return dict(series)


def step_metrics(session: Session, run_id: str, after: int, upto: int) -> list[StepMetrics]:
    """The metrics of steps after..upto, a step at a time (no project check: callers did it)."""
    rows = session.execute(
        select(Metric.step, Metric.name, Metric.value)
        .where(Metric.run_id == run_id, Metric.step > after, Metric.step <= upto)
        .order_by(Metric.step, Metric.name)
    )
    steps: dict[int, dict[str, float]] = defaultdict(dict)
    for step, name, value in rows:
        steps[step][name] = value
    return [StepMetrics(step=step, values=values) for step, values in steps.items()]


def list_samples(
    session: Session,
    project: Project,
    run_id: str,
    step: int | None,
    limit: int,
) -> tuple[int | None, list[Sample]]:
    """Samples of one step (the latest by default), ordered by group then sample."""
    get_run(session, project, run_id)
    if step is None:
        step = session.scalar(select(func.max(Sample.step)).where(Sample.run_id == run_id))
        if step is None:
            return None, []
    stmt = (
        select(Sample)
        .options(selectinload(Sample.reward_history))  # one more query for the page
        .where(Sample.run_id == run_id, Sample.step == step)
        .order_by(Sample.group_index, Sample.sample_index)
        .limit(limit)
    )
    return step, list(session.scalars(stmt))
