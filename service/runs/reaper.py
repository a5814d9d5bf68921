"""The reaper: puts back in the queue the runs that no worker is going to finish.

- A running run whose lease expired (its worker was killed, or its machine lost) goes back to
  `queued`, and its project's quota lets it through again (service/runs/admission.py); the next
  worker resumes it from its latest checkpoint.
- A queued run let through whose task was never published (the broker was down when it was
  admitted) is published now.
- Rescores likewise (service/rescores/service.py).

Each API process makes a pass every settings.reaper_interval_s (service/background.py). An
expired run is claimed with one conditional UPDATE, so replicas reaping at the same moment
re-enqueue it once; a duplicate publish of a queued run is harmless (the older message finds
that it no longer names the run, and exits).
"""

import logging
from datetime import timedelta

from sqlalchemy import select, update

from service.config import Settings
from service.contract.events import EventLevel, EventType
from service.contract.states import RunStatus
from service.db import session_scope
from service.models import Run
from service.models.base import utcnow
from service.models.run_event import add_event
from service.rescores.service import reap_rescores
from service.runs.admission import admit, dispatch_run

log = logging.getLogger(__name__)

# A run just created or resumed is published by its own request after commit; give that a head
# start before the reaper treats the run as never published.
PUBLISH_GRACE = timedelta(seconds=5)


def reap_runs(settings: Settings, publish_grace: timedelta = PUBLISH_GRACE) -> list[str]:
    """One pass; returns the ids of the runs it published."""
    now = utcnow()
    with session_scope(settings.resolved_database_url) as session:
        expired = session.execute(
            select(Run.id, Run.lease_owner, Run.project_id).where(
                Run.status == RunStatus.RUNNING, Run.lease_expires_at < now
            )
        ).all()
        requeued = set()
        for run_id, owner, project_id in expired:
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
                requeued.add(project_id)
                add_event(
                    session,
                    run_id,
                    EventType.RUN_REQUEUED,
                    f"the lease of worker {owner} expired; queued again to resume from the "
                    "latest checkpoint",
                    EventLevel.WARNING,
                    {"worker": owner},
                )
        # (not the runs just requeued: they hold no message, and `admit` lets them through)
        unpublished = session.execute(
            select(Run.id, Run.queue).where(
                Run.status == RunStatus.QUEUED,
                Run.dispatch_id.is_not(None),
                Run.dispatched_at.is_(None),
                Run.created_at < now - publish_grace,
            )
        ).all()
    published = [run_id for run_id, queue in unpublished if dispatch_run(settings, run_id, queue)]
    return published + [run_id for project in requeued for run_id in admit(settings, project)]


def reap(settings: Settings) -> None:
    """One pass of the reaper over runs and rescores."""
    reap_runs(settings)
    reap_rescores(settings, PUBLISH_GRACE)
