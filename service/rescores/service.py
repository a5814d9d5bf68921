"""Re-scoring: when the reward changes, a finished run's stored samples are scored again with
the new reward and reused.

A rescore is a row and a worker task (workers/rescore.py). The task scores the samples step by
step with the new reward (builtin, webhook or composite, exactly as a run scores them; webhook
requests say `"purpose": "rescore"`), replaces each sample's reward and keeps the one it replaced
in reward_history, then writes the run's groups with their new rewards as a file of purpose
offpolicy: a new run trains on it with dataset.offpolicy_file (and may start from the run's
checkpoint with model.checkpoint). One rescore of a run at a time, and only of a run that has
ended, so that no step of the run writes its rewards over the new ones.
"""

from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.config import Settings
from service.contract.events import EventType
from service.contract.states import RESCORE_ACTIVE, TERMINAL, RescoreStatus
from service.contract.tasks import RESCORE_TASK, queue_of
from service.db import after_commit, session_scope
from service.dispatch import enqueue
from service.errors import Conflict, NotFound
from service.graders.judges import check_judges
from service.models import Project, Rescore, Run, Sample
from service.models.base import utcnow
from service.models.run_event import add_event
from service.rescores.schemas import RescoreCreate
from service.runs.service import check_webhooks, get_run


def create_rescore(
    session: Session, settings: Settings, project: Project, run_id: str, body: RescoreCreate
) -> Rescore:
    run = get_run(session, project, run_id)
    if run.status not in TERMINAL:
        raise Conflict(
            f"run {run.id} is {run.status}: re-score it once it has ended (cancel "
            "it to end it now), so that no step writes over the new rewards"
        )
    active = session.scalar(
        select(Rescore).where(Rescore.run_id == run.id, Rescore.status.in_(RESCORE_ACTIVE))
    )
    if active is not None:
        raise Conflict(
            f"rescore {active.id} of run {run.id} is still {active.status}; one "
            "rescore of a run at a time",
            {"rescore_id": active.id},
        )
    check_webhooks(settings, body.reward)
    check_judges(session, project, body.reward)
    total, mean = session.execute(
        select(func.count(), func.avg(Sample.reward)).where(Sample.run_id == run.id)
    ).one()
    if not total:
        raise Conflict(f"run {run.id} has no stored samples to re-score")
    number = session.scalar(select(func.count()).where(Rescore.run_id == run.id)) + 1
    rescore = Rescore(
        run_id=run.id,
        number=number,
        reward=body.reward.model_dump(mode="json"),
        samples_total=total,
        reward_mean_before=mean,
    )
    session.add(rescore)
    session.flush()
    add_event(
        session,
        run.id,
        EventType.RESCORE_QUEUED,
        f"rescore {rescore.id} of the run's {total} samples queued",
        data={"rescore_id": rescore.id, "samples": total},
    )
    queue = queue_of(run.spec)
    after_commit(session, lambda: dispatch_rescore(settings, rescore.id, queue))
    return rescore


def dispatch_rescore(settings: Settings, rescore_id: str, queue: str) -> bool:
    if not enqueue(settings, RESCORE_TASK, rescore_id, queue):
        return False
    with session_scope(settings.resolved_database_url) as session:
        session.execute(
            update(Rescore).where(Rescore.id == rescore_id).values(dispatched_at=utcnow())
        )
    return True


def get_rescore(session: Session, project: Project, run_id: str, rescore_id: str) -> Rescore:
    get_run(session, project, run_id)
    rescore = session.get(Rescore, rescore_id)
    if rescore is None or rescore.run_id != run_id:
        raise NotFound(f"no rescore {rescore_id!r} of run {run_id}")
    return rescore


def list_rescores(session: Session, project: Project, run_id: str) -> list[Rescore]:
    get_run(session, project, run_id)
    return list(
        session.scalars(select(Rescore).where(Rescore.run_id == run_id).order_by(Rescore.number))
    )


def reap_rescores(settings: Settings, publish_grace: timedelta) -> list[str]:
    """The reaper's pass over rescores, as over runs: one whose worker's lease expired goes
    back to queued (it continues after the last step it applied), and a queued one never
    published is published. Returns the ids published."""
    now = utcnow()
    with session_scope(settings.resolved_database_url) as session:
        session.execute(
            update(Rescore)
            .where(Rescore.status == RescoreStatus.RUNNING, Rescore.lease_expires_at < now)
            .values(
                status=RescoreStatus.QUEUED,
                lease_owner=None,
                lease_expires_at=None,
                dispatched_at=None,
            )
        )
        unpublished = session.execute(
            select(Rescore.id, Run.spec)
            .join(Run, Run.id == Rescore.run_id)
            .where(
                Rescore.status == RescoreStatus.QUEUED,
                Rescore.dispatched_at.is_(None),
                Rescore.created_at < now - publish_grace,
            )
        ).all()
    return [
        rescore_id
        for rescore_id, spec in unpublished
        if dispatch_rescore(settings, rescore_id, queue_of(spec))
    ]
