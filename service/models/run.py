from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from gvpo_client.paths import SOURCE_FIELDS
from service.contract.states import RunStatus
from service.models.base import Base, UTCDateTime, new_id, utcnow


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        UniqueConstraint("project_id", "idempotency_key"),
        # a page of a project's runs, newest first (ids are time-ordered), in index order
        Index("ix_runs_project_id_id", "project_id", "id"),
        # the queued or running runs of a queue (the scheduler's and a claiming worker's look)
        Index("ix_runs_queue_status", "queue", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("run"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), index=True, default=RunStatus.QUEUED)
    # From the spec's resources, for the scheduler: the queue, the order among the project's
    # runs waiting there, and the devices the run holds once started (its training processes).
    queue: Mapped[str] = mapped_column(String(200), default="default", server_default="default")
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    devices: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # Why the project's quota holds the queued run back (None: it is not held back); written
    # with the run.waiting event that says so, once per reason.
    waiting_reason: Mapped[str | None] = mapped_column(Text)
    # The spec as the tenant wrote it (with model.checkpoint, no server path in it).
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Where the worker loads the model from, authorised at submission: {"path", "adapter"},
    # the folders of a registered model or a checkpoint. Never shown to the tenant.
    model_source: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The webhook secrets, encrypted (settings.sealer): only the creation and the rotation
    # responses ever show one in clear.
    webhook_secret_encrypted: Mapped[str] = mapped_column(Text)
    # After a rotation the previous secret still verifies callbacks until this moment.
    previous_webhook_secret_encrypted: Mapped[str | None] = mapped_column(Text)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    pause_requested: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text)
    tokens_generated: Mapped[int] = mapped_column(BigInteger, default=0)
    samples_generated: Mapped[int] = mapped_column(BigInteger, default=0)
    # reward/mean of the step `step` names, written with it: a listing shows each run's reward
    # without reading the metrics table.
    reward: Mapped[float | None] = mapped_column(Double)
    # The newest weights the run published for serving (every serving.sync_every_steps steps):
    # the step they are from and their folder, a whole model (a LoRA merged).
    weights_step: Mapped[int | None] = mapped_column(Integer)
    weights_path: Mapped[str | None] = mapped_column(String(1024))
    # When a request first named the run as its model: a run publishes weights only from then
    # on (workers/publish.py), so runs nobody serves write none.
    serving_asked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # The task message meant to start the run (its Celery task id): set when the project's quota
    # lets the run through, before it is published; cleared when a worker claims the run. A
    # message starts the run that holds it (workers/claiming.py: runs of a queue may swap them),
    # and any other delivery exits at once, so pausing and resuming a queued run reuses its
    # message instead of adding one per resume.
    dispatch_id: Mapped[str | None] = mapped_column(String(64), index=True)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # When a worker last took the run (started_at is the first time): its attempt's device
    # time counts from here, and a queue is shared by serving first the projects served least
    # recently.
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The notify_url outbox (service/runs/notify.py, NotifyState): None = nothing to send, pending
    # = send once the run has ended, then delivered or failed. Not due before notify_due_at, which
    # is both the retry time and a sender's claim expiry.
    notify_state: Mapped[str | None] = mapped_column(String(16), index=True)
    notify_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    notify_due_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    @property
    def model_folders(self) -> dict[str, str | None]:
        """Where the run loads its model from: model_source (a run recorded before that
        column has the folders in its spec)."""
        if self.model_source is not None:
            return dict(self.model_source)
        model = self.spec.get("model", {})
        return {name: model.get(name) for name in SOURCE_FIELDS}


def mark_serving_asked(session: Session, run_id: str) -> None:
    """Note that the run's model has been asked for (once): from now on it publishes its
    weights. An UPDATE guarded by the column, so that concurrent askers agree on the first."""
    session.execute(
        update(Run)
        .where(Run.id == run_id, Run.serving_asked_at.is_(None))
        .values(serving_asked_at=utcnow())
        .execution_options(synchronize_session=False)
    )
