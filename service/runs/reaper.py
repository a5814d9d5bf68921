"""The reaper: puts back in the queue the runs that no worker is going to finish.

- A running run whose lease expired (its worker was killed, or its machine lost) goes back to
  `queued` and is published again; the next worker resumes it from its latest checkpoint.
- A queued run whose task was never published (the broker was down when it was submitted or
  resumed) is published now.
- Rescores likewise (service/rescores/service.py).

Each API process runs one reaper thread. An expired run is claimed with one conditional UPDATE,
so replicas reaping at the same moment re-enqueue it once; a duplicate publish of a queued run
is harmless (the second delivery finds the lease taken and exits).
"""

import logging
import threading
from datetime import timedelta

from sqlalchemy import select, update

from service.config import Settings
from service.contract.events import EventLevel, EventType
from service.contract.states import RunStatus
from service.contract.tasks import queue_of
from service.db import session_scope
from service.models import Run
from service.models.base import utcnow
from service.models.run_event import add_event
from service.rescores.service import reap_rescores
from service.runs.service import dispatch_run

log = logging.getLogger(__name__)

# A run just created or resumed is published by its own request after commit; give that a head
# start before the reaper treats the run as never published.
PUBLISH_GRACE = timedelta(seconds=5)


def reap_runs(settings: Settings, publish_grace: timedelta = PUBLISH_GRACE) -> list[str]:
    """One pass; returns the ids of the runs it published."""
    now = utcnow()
    with session_scope(settings.resolved_database_url) as session:
        expired = session.execute(
            select(Run.id, Run.lease_owner).where(
                Run.status == RunStatus.RUNNING, Run.lease_expires_at < now
            )
        ).all()
        for run_id, owner in expired:
            taken = (
                session.execute(
                    update(Run)
                    .where(
                        Run.id == run_id,
                        Run.status == RunStatus.RUNNING,
                        Run.lease_expires_at < now,
                    )
                    .values(
                        status=RunStatus.QUEUED,
                        lease_owner=None,
                        lease_expires_at=None,
                        dispatched_at=None,
                    )
                ).rowcount
                == 1
            )
            if taken:
                add_event(
                    session,
                    run_id,
                    EventType.RUN_REQUEUED,
                    f"the lease of worker {owner} expired; queued again to resume from the "
                    "latest checkpoint",
                    EventLevel.WARNING,
                    {"worker": owner},
                )
        # (the runs just requeued are among these: same transaction, old created_at)
        unpublished = session.execute(
            select(Run.id, Run.spec).where(
                Run.status == RunStatus.QUEUED,
                Run.dispatched_at.is_(None),
                Run.created_at < now - publish_grace,
            )
        ).all()
    return [
        run_id for run_id, spec in unpublished if dispatch_run(settings, run_id, queue_of(spec))
    ]


class Reaper(threading.Thread):
    """Reaps every `reaper_interval_s` until `stopped` is set."""

    def __init__(self, settings: Settings, stopped: threading.Event) -> None:
        super().__init__(name="gvpo-reaper", daemon=True)
        self.settings, self.stopped = settings, stopped

    def run(self) -> None:
        while not self.stopped.wait(self.settings.reaper_interval_s):
            try:
                reap_runs(self.settings)
                reap_rescores(self.settings, PUBLISH_GRACE)
            except Exception:  # a database or broker outage: try again next interval
                log.exception("reaper pass failed")
