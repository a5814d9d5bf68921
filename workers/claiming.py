"""How a worker takes a run: one compare-and-set of its lease, and the reasons a delivered task
message may not start it (superseded by a newer message, already ended, paused, leased by a
live worker). Asked before any model library loads, so a stale message costs nothing."""

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, update
from sqlalchemy.orm import Session

from service.contract.events import EventType
from service.contract.states import TERMINAL, RunStatus, sources
from service.db import session_scope
from service.models import Run
from service.models.base import utcnow
from service.models.run_event import add_event

log = logging.getLogger(__name__)


class Claiming:
    """The claim half of RunRecorder (which sets settings, run_id, worker_id and url)."""

    def _lease_until(self):
        return utcnow() + timedelta(seconds=self.settings.lease_seconds)

    def claim(self, task_id: str | None = None) -> tuple[dict[str, Any] | None, str]:
        """Take the run's lease and return its spec; (None, why) when it cannot start (see
        `unstartable`).

        One conditional UPDATE (compare-and-set), so two deliveries racing for the same run
        cannot both win, on SQLite as on PostgreSQL.
        """
        for _ in range(2):  # once more if the run was resumed while we looked
            with session_scope(self.url) as session:
                if self._take(session, task_id):
                    return self._started(session), ""
            if why := self.unstartable(task_id):
                return self.skip(why)
        return self.skip("the run kept changing state; a later message starts it")

    def unstartable(self, task_id: str | None = None) -> str | None:
        """Why the run cannot start now, found without taking its lease (a worker asks before
        it loads any model library); None when it may. With `task_id`, the delivered message:
        one the run's dispatch_id does not name is superseded, and one that finds the run
        paused is used up (its resume publishes a new one)."""
        with session_scope(self.url) as session:
            run = session.get(Run, self.run_id)
            if run is None:
                return "no such run"
            if task_id is not None and run.dispatch_id not in (None, task_id):
                return f"superseded by task {run.dispatch_id}"
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

    def _take(self, session: Session, task_id: str | None) -> bool:
        now = utcnow()
        by_message = [or_(Run.dispatch_id.is_(None), Run.dispatch_id == task_id)] if task_id else []
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
        run = session.get(Run, self.run_id)
        add_event(
            session,
            run.id,
            EventType.RUN_STARTED,
            f"worker {self.worker_id} started the run",
            data={"attempt": run.attempts},
        )
        return dict(run.spec)
