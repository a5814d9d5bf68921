"""Quotas: which of a project's queued runs go to the workers, and when.

A project's quota is its own (`gvpo quota set`) or else the settings' (GVPO_QUOTA_*):
`max_concurrent_runs`, `max_gpus` (the devices its started runs hold: resources.gpus, or
training processes) and `gpu_hours` (device-hours spent in all, from its usage records).

- A queued run goes to the workers (is *admitted*: a task message names it, its dispatch_id)
  when the project's admitted and started runs leave room for it. Otherwise it stays queued,
  with its waiting_reason and a `run.waiting` event saying why (once per reason), and a later
  pass lets it through: each API process makes one every settings.schedule_interval_s
  (`schedule`, on a background thread: service/main.py), and one follows each submission and
  resume.
- The project's waiting runs are let through in order, highest resources.priority first, then
  oldest; one that does not fit holds back those behind it, so a large run is not passed over
  for ever by small ones.
- A spent budget: the project's running runs are asked to pause (each checkpoints after its
  step and stops), and its admitted runs that no worker took yet give their message back.
  Resumed, they wait until an operator raises the budget.

A pass over a project begins by writing the project's row, so that two passes (two API
processes) over one project take turns, on SQLite as on PostgreSQL.
"""

import logging
from dataclasses import asdict, dataclass

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from service.config import Settings
from service.contract.events import EventType
from service.contract.states import RunStatus
from service.contract.tasks import RUN_TASK
from service.db import session_scope
from service.dispatch import enqueue
from service.models import Project, Run, Usage
from service.models.base import new_id, utcnow
from service.models.run_event import add_event

log = logging.getLogger(__name__)

HELD = (RunStatus.QUEUED, RunStatus.PAUSED)  # with a message: on their way to a worker


@dataclass(frozen=True)
class Quota:
    max_concurrent_runs: int | None = None
    max_gpus: int | None = None
    gpu_hours: float | None = None


def quota_of(project: Project, settings: Settings) -> Quota:
    """The project's quota: its own limits, else the settings' defaults (None: no limit)."""

    def pick(own, default):
        return own if own is not None else default

    return Quota(
        pick(project.max_concurrent_runs, settings.quota_max_concurrent_runs),
        pick(project.max_gpus, settings.quota_max_gpus),
        pick(project.gpu_hours, settings.quota_gpu_hours),
    )


def hours_used(session: Session, project_id: str) -> float:
    """The device-hours the project's runs have used, by their usage records."""
    seconds = session.scalar(
        select(func.sum(Usage.device_seconds)).where(Usage.project_id == project_id)
    )
    return (seconds or 0.0) / 3600


@dataclass
class _Use:
    runs: int
    devices: int
    hours: float


def _held_back(quota: Quota, use: _Use, devices: int) -> tuple[str, str] | None:
    """(limit, why) when a run needing `devices` does not fit the quota now; None when it does."""
    if quota.gpu_hours is not None and use.hours >= quota.gpu_hours:
        return "gpu_hours", (
            f"the project's budget of {quota.gpu_hours:g} device-hours is spent "
            f"({use.hours:.3f} h used); the run waits until an operator raises it"
        )
    if quota.max_concurrent_runs is not None and use.runs >= quota.max_concurrent_runs:
        return "max_concurrent_runs", (
            f"the project has {use.runs} run{'s' * (use.runs != 1)} started or on their way to "
            "a worker, its limit "
            f"(max_concurrent_runs {quota.max_concurrent_runs}); the run starts when one ends"
        )
    if quota.max_gpus is not None and use.devices + devices > quota.max_gpus:
        if devices > quota.max_gpus:
            return "max_gpus", (
                f"the run needs {devices} devices, more than the project may hold at once "
                f"(max_gpus {quota.max_gpus}); it waits until an operator raises the limit"
            )
        return "max_gpus", (
            f"the project's runs started or on their way to a worker hold {use.devices} of its "
            f"{quota.max_gpus} devices (max_gpus) and the run needs {devices}; it starts when "
            "enough are free"
        )
    return None


def schedule(settings: Settings) -> list[str]:
    """One scheduler pass: `admit` over each project with runs its quota holds back, or with
    runs still spending a budget that is spent. Returns the ids of the runs let through."""
    with session_scope(settings.resolved_database_url) as session:
        waiting = set(
            session.scalars(
                select(Run.project_id)
                .where(Run.status == RunStatus.QUEUED, Run.dispatch_id.is_(None))
                .distinct()
            )
        )
        spending = session.execute(
            select(Project.id, Project.gpu_hours)
            .where(
                Project.id.in_(
                    select(Run.project_id).where(
                        Run.status.in_((RunStatus.RUNNING, RunStatus.QUEUED)),
                        Run.dispatch_id.is_not(None) | ~Run.pause_requested,
                    )
                )
            )
            .distinct()
        ).all()
        budgets = {
            project: hours
            for project, own in spending
            if (hours := own if own is not None else settings.quota_gpu_hours) is not None
        }
        spent = {
            project
            for project, seconds in session.execute(
                select(Usage.project_id, func.sum(Usage.device_seconds))
                .where(Usage.project_id.in_(budgets))
                .group_by(Usage.project_id)
            )
            if seconds / 3600 >= budgets[project]
        }
    return [run_id for project in sorted(waiting | spent) for run_id in admit(settings, project)]


def admit(settings: Settings, project_id: str) -> list[str]:
    """One pass over the project's queued runs; returns the ids of those it let through
    (published to their queues once committed)."""
    url = settings.resolved_database_url
    with session_scope(url) as session:
        session.execute(
            update(Project).where(Project.id == project_id).values(scheduled_at=utcnow())
        )
        project = session.get(Project, project_id)
        if project is None:
            return []
        quota = quota_of(project, settings)
        live = list(
            session.scalars(
                select(Run)
                .where(
                    Run.project_id == project_id,
                    or_(
                        Run.status == RunStatus.RUNNING,
                        Run.status.in_(HELD) & Run.dispatch_id.is_not(None),
                        (Run.status == RunStatus.QUEUED) & Run.dispatch_id.is_(None),
                    ),
                )
                .order_by(Run.priority.desc(), Run.id)
            )
        )
        waiting = [r for r in live if r.status == RunStatus.QUEUED and r.dispatch_id is None]
        started = [r for r in live if r not in waiting]
        use = _Use(
            len(started),
            sum(r.devices for r in started),
            hours_used(session, project_id) if quota.gpu_hours is not None else 0.0,
        )
        if quota.gpu_hours is not None and use.hours >= quota.gpu_hours:
            _stop_spending(session, started, quota, use)
        admitted, blocked = [], None
        for run in waiting:
            held = blocked or _held_back(quota, use, run.devices)
            if held is None:
                run.dispatch_id, run.dispatched_at = new_id("task"), None
                if run.waiting_reason is not None:
                    add_event(session, run.id, EventType.RUN_ADMITTED, "the quota lets it start")
                run.waiting_reason = None
                admitted.append((run.id, run.queue, run.dispatch_id))
                use.runs, use.devices = use.runs + 1, use.devices + run.devices
            else:
                _wait(session, run, held, quota, use)
                blocked = blocked or (held[0], f"behind run {run.id}, which waits: {held[1]}")
    return [run_id for run_id, queue, tid in admitted if publish_run(settings, run_id, queue, tid)]


def _wait(session: Session, run: Run, held: tuple[str, str], quota: Quota, use: _Use) -> None:
    """Hold the run back, saying why: an event when the limit that holds it changed."""
    limit, why = held
    if run.waiting_reason is None or not run.waiting_reason.startswith(f"{limit}: "):
        add_event(
            session,
            run.id,
            EventType.RUN_WAITING,
            f"waiting: {why}",
            data={"limit": limit, "quota": asdict(quota), "use": asdict(use)},
        )
    run.waiting_reason = f"{limit}: {why}"


def _stop_spending(session: Session, started: list[Run], quota: Quota, use: _Use) -> None:
    """The budget is spent: running runs pause after their step; admitted ones that no worker
    took yet give their message back (a delivery then finds nothing to start)."""
    why = f"the project's budget of {quota.gpu_hours:g} device-hours is spent ({use.hours:.3f} h)"
    for run in started:
        if run.status == RunStatus.RUNNING and not run.pause_requested:
            run.pause_requested = True
            add_event(
                session,
                run.id,
                EventType.RUN_PAUSE_REQUESTED,
                f"{why}: the run checkpoints and pauses after this step",
                data={"limit": "gpu_hours", "quota": asdict(quota), "use": asdict(use)},
            )
        elif run.status == RunStatus.QUEUED:
            run.dispatch_id, run.dispatched_at = None, None


def dispatch_run(settings: Settings, run_id: str, queue: str) -> bool:
    """Publish a new task message for an admitted queued run (its last one was never
    published: the broker was down); False when the run is no longer queued and admitted, or
    when the broker is unreachable (the reaper tries again).

    The run's dispatch_id names the new message before it is published: a worker that receives
    any other (an older one this supersedes) finds nothing to start, so a run has one live
    message."""
    task_id = new_id("task")
    with session_scope(settings.resolved_database_url) as session:
        named = session.execute(
            update(Run)
            .where(Run.id == run_id, Run.status == RunStatus.QUEUED, Run.dispatch_id.is_not(None))
            .values(dispatch_id=task_id, dispatched_at=None)
        ).rowcount
    return bool(named) and publish_run(settings, run_id, queue, task_id)


def publish_run(settings: Settings, run_id: str, queue: str, task_id: str) -> bool:
    """Publish the message `task_id` that the run was given, and note when; False when the
    broker is unreachable (the run stays admitted, unpublished, for the reaper)."""
    if not enqueue(settings, RUN_TASK, run_id, queue, task_id):
        return False
    with session_scope(settings.resolved_database_url) as session:
        session.execute(
            update(Run)
            .where(Run.dispatch_id == task_id)  # the run that holds the message now
            .values(dispatched_at=utcnow())
        )
    return True
