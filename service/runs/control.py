"""What a user asks of a run: cancel, pause, resume.

Each change is a compare-and-set on the run's row (one conditional UPDATE: it applies only if the
run is still in a state the contract allows it from), so two requests racing for one run cannot
both win, on SQLite as on PostgreSQL: a paused run that is cancelled and resumed at the same
moment either ends cancelled, or is queued and then cancelled, never queued after its cancel.
A worker moves runs the same way (workers/records.py).
"""

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.config import Settings
from service.contract.events import EventType
from service.contract.states import ACTIONS, TERMINAL, RunStatus
from service.db import after_commit
from service.errors import Conflict
from service.models import Project, Run
from service.models.base import utcnow
from service.models.run_event import add_event
from service.runs.admission import admit, dispatch_run
from service.runs.service import get_run

# A run can move under a request between its tries (a worker claims it, the reaper requeues it);
# each try re-reads it, and the states are few, so a handful always settles.
TRIES = 4


def _swap(session: Session, run: Run, states: frozenset[RunStatus], *where, **values: Any) -> bool:
    """Write `values` to `run` if it is still in one of `states` (and `where` holds); True if
    this request made the change. `run` is re-read either way."""
    changed = session.execute(
        update(Run)
        .where(Run.id == run.id, Run.status.in_(states), *where)
        .values(**values)
        .execution_options(synchronize_session=False)
    ).rowcount
    session.refresh(run)
    return changed == 1


def _refused(run: Run, action: str) -> Conflict:
    """409 for `action` asked of a run in a state that does not allow it."""
    allowed = " or ".join(status for status in RunStatus if status in ACTIONS[action])
    return Conflict(f"run {run.id} is {run.status}; only a {allowed} run can be {action}d")


def _ask_the_worker(session: Session, run: Run, flag: str, event: EventType, message: str) -> bool:
    """Set `flag` (cancel_requested, pause_requested) of a running run, for its worker to honour
    between steps. True when the run is running with the flag set: by this request (which
    records `event`), or by an earlier one (the same answer again)."""
    running = frozenset({RunStatus.RUNNING})
    if _swap(session, run, running, ~getattr(Run, flag), **{flag: True}):
        add_event(session, run.id, event, message)
    return run.status == RunStatus.RUNNING and getattr(run, flag)


def _unsettled(run: Run, action: str) -> Conflict:
    return Conflict(f"run {run.id} kept changing state ({run.status} now); {action} it again")


def cancel_run(session: Session, project: Project, run_id: str) -> Run:
    run = get_run(session, project, run_id)
    for _ in range(TRIES):
        was = run.status
        # No worker owns it: cancel now; a later delivery of its task sees the state and exits.
        idle = frozenset({RunStatus.QUEUED, RunStatus.PAUSED})
        if _swap(session, run, idle, status=RunStatus.CANCELLED, finished_at=utcnow()):
            add_event(session, run.id, EventType.RUN_CANCELLED, f"run cancelled while {was}")
            return run
        # A running loop checks this flag between steps and stops cooperatively.
        asked = "cancel requested; stops after this step"
        if _ask_the_worker(session, run, "cancel_requested", EventType.RUN_CANCEL_REQUESTED, asked):
            return run
        if run.status in TERMINAL:
            raise Conflict(f"run {run_id} is already {run.status}; it cannot be cancelled")
    raise _unsettled(run, "cancel")


def pause_run(session: Session, project: Project, run_id: str) -> Run:
    run = get_run(session, project, run_id)
    for _ in range(TRIES):
        if _swap(session, run, frozenset({RunStatus.QUEUED}), status=RunStatus.PAUSED):
            add_event(session, run.id, EventType.RUN_PAUSED, "run paused before it started")
            return run
        # The loop checks this between steps: it writes a checkpoint, frees the worker and exits.
        asked = "pause requested; the run checkpoints and stops after this step"
        if _ask_the_worker(session, run, "pause_requested", EventType.RUN_PAUSE_REQUESTED, asked):
            return run
        if run.status not in ACTIONS["pause"]:
            raise _refused(run, "pause")
    raise _unsettled(run, "pause")


def resume_run(session: Session, settings: Settings, project: Project, run_id: str) -> Run:
    run = get_run(session, project, run_id)
    paused = frozenset({RunStatus.PAUSED})
    if not _swap(session, run, paused, status=RunStatus.QUEUED, pause_requested=False):
        raise _refused(run, "resume")
    add_event(
        session,
        run.id,
        EventType.RUN_RESUME_REQUESTED,
        f"run queued again; it continues after step {run.step}",
    )
    # A run paused before any worker took it still has its message in the broker (a worker that
    # took it while paused clears dispatch_id): that message starts it now, no second one (the
    # reaper publishes one that never was). Else its project's quota lets it through.
    if run.dispatch_id is None:
        after_commit(session, lambda: admit(settings, project.id))
    elif run.dispatched_at is None:
        after_commit(session, lambda: dispatch_run(settings, run.id, run.queue))
    return run
