"""Reading a run's metric series and samples (the worker writes them as upserts by step)."""

import bisect
import math
from array import array
from collections import defaultdict

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session, selectinload

from service.metrics.schemas import MetricName, StepMetrics
from service.models import Metric, MetricPage, MetricRollup, Project, Sample
from service.models.metric import LEVELS, PAGE_COLUMNS, bucket_of, page_of, unpack
from service.runs.service import check_run

# (step, value) or, with times, (step, value, unix seconds it was recorded): tuples of numbers,
# which the garbage collector does not track
Point = tuple

# Built once, bound per request (SQLAlchemy caches their compiled form), run on the connection:
# a 100k-step run's chart reads thousands of rows, and the ORM's handling would double its cost.
_SUMMARY = (
    select(
        MetricRollup.name,
        func.sum(MetricRollup.count),
        func.min(MetricRollup.first_step),
        func.max(MetricRollup.last_step),
    )
    .where(MetricRollup.run_id == bindparam("run"), MetricRollup.level == LEVELS)
    .group_by(MetricRollup.name)
    .order_by(MetricRollup.name)
)
_NAMED_SUMMARY = _SUMMARY.where(MetricRollup.name.in_(bindparam("names", expanding=True)))
_PAGES = {
    timed: select(
        MetricPage.name,
        MetricPage.step_data,
        MetricPage.value_data,
        *([MetricPage.time_data] if timed else []),  # fewer bytes to fetch without them
    )
    .where(
        MetricPage.run_id == bindparam("run"),
        MetricPage.level == bindparam("level"),
        MetricPage.name.in_(bindparam("names", expanding=True)),
        MetricPage.page >= bindparam("page"),
    )
    .order_by(MetricPage.name, MetricPage.page)
    for timed in (True, False)
}


def metric_series(
    session: Session,
    project: Project,
    run_id: str,
    names: list[str] | None,
    since_step: int | None,
    max_points: int | None = None,
    with_time: bool = True,
) -> tuple[dict[str, list[Point]], list[str]]:
    """Each series' points from `since_step` on, oldest first, and the names of those
    downsampled: with `max_points`, a series with more points is read from the finest rollup
    level with at most max_points / 2 buckets in its range, each bucket giving its lowest and
    highest point, so no extreme is lost."""
    check_run(session, project, run_id)
    start = since_step or 0
    raw, by_level = list(names or []), defaultdict(list)
    if max_points is not None:
        raw = []
        for name, (count, _, last) in _summary(session, run_id, names).items():
            level = _level(start, last, max_points) if count > max_points else None
            (raw.append(name) if level is None else by_level[level].append(name))
    series: dict[str, list[Point]] = defaultdict(list)
    if raw or max_points is None:
        stmt = select(Metric.name, Metric.step, Metric.value, Metric.time).where(
            Metric.run_id == run_id, Metric.step >= start
        )
        if raw:
            stmt = stmt.where(Metric.name.in_(raw))
        rows = session.connection().execute(stmt.order_by(Metric.name, Metric.step)).all()
        for name, step, value, time in rows:  # fetched at once: row by row costs twice as much
            series[name].append((step, value, time) if with_time else (step, value))
    for level, level_names in by_level.items():
        _extremes(session, series, run_id, level_names, level, start, with_time)
    return dict(series), sorted(n for names in by_level.values() for n in names)


def _summary(
    session: Session, run_id: str, names: list[str] | None
) -> dict[str, tuple[int, int, int]]:
    """name -> (points, first step, last step), from the coarsest rollups."""
    stmt, params = (_NAMED_SUMMARY, {"names": names}) if names else (_SUMMARY, {})
    rows = session.connection().execute(stmt, {"run": run_id, **params})
    return {name: (int(n), first, last) for name, n, first, last in rows}


def metric_names(session: Session, project: Project, run_id: str) -> list[MetricName]:
    check_run(session, project, run_id)
    return [
        MetricName(name=name, points=n, first_step=first, last_step=last)
        for name, (n, first, last) in _summary(session, run_id, None).items()
    ]


def _level(start: int, last: int, max_points: int) -> int | None:
    """The finest rollup level whose buckets over start..last give at most max_points."""
    for level in range(1, LEVELS + 1):
        if 2 * (bucket_of(last, level) - bucket_of(start, level) + 1) <= max_points:
            return level
    return LEVELS


def _extremes(
    session: Session,
    series: dict[str, list[Point]],
    run_id: str,
    names: list[str],
    level: int,
    start: int,
    with_time: bool,
) -> None:
    """Each bucket's lowest and highest point at `level` from `start`, in step order, added to
    `series` (one point where they are the same), from the buckets' pages."""
    page = page_of(bucket_of(start, level))
    params = {"run": run_id, "level": level, "names": names, "page": page}
    typecodes = list(PAGE_COLUMNS.values())[: 3 if with_time else 2]
    pages = defaultdict(list)
    for name, *arrays in session.connection().execute(_PAGES[with_time], params).all():
        pages[name].append(arrays)
    for name, rows in pages.items():
        # a series' pages joined, each array decoded at once
        joined = zip(typecodes, zip(*rows, strict=True), strict=True)
        series[name] = _points([unpack(t, b"".join(parts)) for t, parts in joined], start)


def _points(columns: list[array], start: int) -> list[Point]:
    """The points of a series' pages (steps, values and maybe times) from step `start` on: steps
    of -1 mark no point (a bucket of one point, a page's buckets not reached yet), and the first
    page may begin before `start`. A series recorded at every step has holes only at the end of
    its last page: its points are cut out whole instead of tested one by one."""
    steps = columns[0]
    end = len(steps)
    while end and steps[end - 1] == -1:
        end -= 1
    if not steps[:end].count(-1):
        first = bisect.bisect_left(steps, start, 0, end)
        columns = [c[first:end] for c in columns]
        if len(columns) == 2 or not any(map(math.isnan, columns[2])):
            return list(zip(*columns, strict=True))
    if len(columns) == 2:
        return [point for point in zip(*columns, strict=True) if point[0] >= start]
    # NaN: no time recorded
    return [(s, v, None if t != t else t) for s, v, t in zip(*columns, strict=True) if s >= start]


def step_metrics(session: Session, run_id: str, after: int, upto: int) -> list[StepMetrics]:
    """The metrics of steps after..upto, a step at a time (no project check: callers did it)."""
    names = list(_summary(session, run_id, None))  # by name: the key's ranges, not a scan
    rows = session.execute(
        select(Metric.step, Metric.name, Metric.value)
        .where(Metric.run_id == run_id, Metric.name.in_(names))
        .where(Metric.step > after, Metric.step <= upto)
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
    check_run(session, project, run_id)
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
