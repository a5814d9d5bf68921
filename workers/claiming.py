"""How a worker takes a run: one compare-and-set of its lease, and the reasons a delivered task
message may not start it (superseded by a newer message, already ended, paused, leased by a
live worker). Asked before any model library loads, so a stale message costs nothing.

A run's message is its place in the queue more than an order to start that run: the run that
holds it (dispatch_id) is the one it starts, and when it is delivered the worker starts the
run its queue should serve next, which may hold another message. The two runs swap messages,
so the one passed over keeps a place. What a queue serves next (fair share): the project whose
started runs hold the fewest devices on that queue, then the one whose run a worker took least
recently; among that project's runs, the highest resources.priority, then the oldest. Only
runs holding a message are candidates: those the project's quota let through
(service/runs/admission.py)."""

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Row, case, func, or_, select, update
from sqlalchemy.orm import Session

from service.contract.events import EventLevel, EventType
from service.contract.states import TERMINAL, RunStatus, sources
from service.db import session_scope
from service.models import Run, RunEvent
from service.models.base import utcnow
from service.models.run_event import add_event
from workers.retrying import retrying

log = logging.getLogger(__name__)

_NEVER = datetime(1970, 1, 1, tzinfo=UTC)  # a project no worker has served on the queue yet


class Claiming:
    """The lease half of RunRecorder (which sets settings, run_id, worker_id and url, and
    writes the attempt's usage): taking a run, and giving it back to the queue."""

    def _lease_until(self):
        return utcnow() + timedelta(seconds=self.settings.lease_seconds)

    def claim(self, task_id: str | None = None) -> tuple[dict[str, Any] | None, str]:
        """Take the lease of the run the message `task_id` should start (the one it names
        without a message; run_id then names it) and return its spec; (None, why) when it
        cannot start (see `unstartable`).

        Conditional UPDATEs (compare-and-set) in one transaction: two deliveries racing for the
        same run, or swapping messages with it, cannot both win, on SQLite as on PostgreSQL.
        """
        for _ in range(3):  # again if the run was resumed, or another worker took ours
            with session_scope(self.url) as session:
                holder = self._holder(session, task_id)
                if self._take(session, task_id, holder, self._next_in_queue(session, holder)):
                    return self._started(session), ""
                session.rollback()  # a swap half made
            if why := self.unstartable(task_id):
                return self.skip(why)
        return self.skip("the run kept changing state; a later message starts it")

    def unstartable(self, task_id: str | None = None) -> str | None:
        """Why the run cannot start now, found without taking its lease (a worker asks before
        it loads any model library); None when it may. With `task_id`, the delivered message:
        one the run's dispatch_id does not name is superseded, and one that finds the run
        paused is used up (its resume publishes a new one)."""
        with session_scope(self.url) as session:
            run = self._holder(session, task_id) or session.get(Run, self.run_id)
            if run is None:
                return "no such run"
            self.run_id = run.id
            if task_id is not None and run.dispatch_id != task_id:
                if run.dispatch_id is not None:
                    return f"superseded by task {run.dispatch_id}"
                if run.status == RunStatus.QUEUED:  # held back by its quota: no message
                    return "the run waits for its project's quota"
            if run.status in TERMINAL:
                return f"run is already {run.status}"
            if run.status == RunStatus.PAUSED and (
                task_id is None or run.dispatch_id is None or self._consumed(session, task_id)
            ):
                return "run is paused"
            held = run.lease_owner not in (None, self.worker_id)
            if run.status == RunStatus.RUNNING and held and run.lease_expires_at > utcnow():
                return f"run is leased by {run.lease_owner} until {run.lease_expires_at}"
        return None

    def skip(self, why: str) -> tuple[None, str]:
        log.info("skipping run %s: %s", self.run_id, why)
        return None, why

    def _holder(self, session: Session, task_id: str | None) -> Run | None:
        """The run the message `task_id` stands for now (None: no run holds it)."""
        if task_id is None:
            return None
        return session.scalar(select(Run).where(Run.dispatch_id == task_id))

    def _next_in_queue(self, session: Session, holder: Run | None) -> Row | None:
        """The queued run that the message `holder` holds should start: its queue's next by
        fair share (see the module's docstring). None without a holder, or when it is not
        queued."""
        if holder is None or holder.status != RunStatus.QUEUED:
            return None
        queued = session.execute(
            select(Run.id, Run.project_id, Run.priority, Run.dispatch_id, Run.dispatched_at).where(
                Run.queue == holder.queue,
                Run.status == RunStatus.QUEUED,
                Run.dispatch_id.is_not(None),
            )
        ).all()
        if not queued:  # claimed, paused or cancelled since the holder was read
            return None
        first: dict[str, str] = {}  # each project's oldest run waiting: who waited longest
        for run in sorted(queued, key=lambda run: run.id, reverse=True):
            first[run.project_id] = run.id
        served = {
            project: (held, last or _NEVER)
            for project, held, last in session.execute(
                select(
                    Run.project_id,
                    func.sum(case((Run.status == RunStatus.RUNNING, Run.devices), else_=0)),
                    func.max(Run.claimed_at),
                )
                .where(Run.queue == holder.queue, Run.project_id.in_(first))
                .group_by(Run.project_id)
            )
        }
        return min(  # (each statement sees the database as it is then: .get, not [])
            queued,
            key=lambda run: (
                *served.get(run.project_id, (0, _NEVER)),
                first[run.project_id],
                -run.priority,
                run.id,
            ),
        )

    def _take(
        self, session: Session, task_id: str | None, holder: Run | None, best: Row | None
    ) -> bool:
        """Take `best` (the message's holder, or the run the holder yields its message to).
        Without a holder: the named run, if no message was delivered, or if the delivered one
        started it before and its worker was lost (a broker's redelivery)."""
        now = utcnow()
        if best is not None and holder is not None and best.id != holder.id:
            swapped = session.execute(
                update(Run)
                .where(Run.id == holder.id, Run.dispatch_id == task_id)
                .values(dispatch_id=best.dispatch_id, dispatched_at=best.dispatched_at)
                .execution_options(synchronize_session=False)
            ).rowcount
            if swapped != 1:
                return False
            task_id = best.dispatch_id
        if (taken := best or holder) is not None:
            self.run_id = taken.id
            by_message = [Run.dispatch_id == task_id]
        elif task_id is not None:
            by_message = [Run.dispatch_id.is_(None), Run.status == RunStatus.RUNNING]
        else:
            by_message = []
        return (
            session.execute(
                update(Run)
                # a paused run waits for /resume, which queues it again
                .where(
                    Run.id == self.run_id,
                    Run.status.in_(sources(RunStatus.RUNNING)),
                    or_(
                        Run.lease_owner.is_(None),
                        Run.lease_owner == self.worker_id,
                        Run.lease_expires_at < now,
                    ),
                    *by_message,
                )
                .values(
                    status=RunStatus.RUNNING,
                    lease_owner=self.worker_id,
                    lease_expires_at=self._lease_until(),
                    started_at=func.coalesce(Run.started_at, now),
                    claimed_at=now,
                    attempts=Run.attempts + 1,
                    dispatch_id=None,
                )
            ).rowcount
            == 1
        )

    def _consumed(self, session: Session, task_id: str) -> bool:
        """Mark the run's message `task_id` used (it could not start the run); False when the
        run was queued again meanwhile, keeping that message to start it."""
        return (
            session.execute(
                update(Run)
                .where(
                    Run.id == self.run_id,
                    Run.dispatch_id == task_id,
                    Run.status != RunStatus.QUEUED,
                )
                .values(dispatch_id=None)
            ).rowcount
            == 1
        )

    def _started(self, session: Session) -> dict[str, Any]:
        session.expire_all()  # read before the claim's UPDATE
        run = session.get(Run, self.run_id)
        self.attempt = run.attempts
        add_event(
            session,
            run.id,
            EventType.RUN_STARTED,
            f"worker {self.worker_id} started the run",
            data={"attempt": run.attempts},
        )
        return dict(run.spec)

    @retrying
    def requeue(self, message: str, data: dict) -> bool:
        """Give the run back to the queue (its lease, its message), to resume from its latest
        checkpoint when the project's quota lets it through again; False when this worker no
        longer holds it."""
        with session_scope(self.url) as session:
            moved = session.execute(
                update(Run)
                .where(
                    Run.id == self.run_id,
                    Run.status == RunStatus.RUNNING,
                    Run.lease_owner == self.worker_id,
                )
                .values(
                    status=RunStatus.QUEUED,
                    lease_owner=None,
                    lease_expires_at=None,
                    dispatch_id=None,
                    dispatched_at=None,
                )
            ).rowcount
            if moved:
                self._write_spending(session)
                add_event(
                    session, self.run_id, EventType.RUN_REQUEUED, message, EventLevel.WARNING, data
                )
            return moved == 1

    @retrying
    def gang_breaks(self, checkpoint_step: int) -> int:
        """How many times in a row the run's gang broke up since its checkpoint of
        `checkpoint_step` (requeue events that say so, since the last that did not)."""
        with session_scope(self.url) as session:
            requeues = session.scalars(
                select(RunEvent.data)
                .where(RunEvent.run_id == self.run_id, RunEvent.type == EventType.RUN_REQUEUED)
                .order_by(RunEvent.id.desc())
            )
            breaks = 0
            for data in requeues:
                if not data or not data.get("gang") or data["checkpoint_step"] != checkpoint_step:
                    break
                breaks += 1
            return breaks
