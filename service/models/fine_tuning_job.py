from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from service.contract.limits import MAX_ID, MAX_PATH
from service.models.base import Base, UTCDateTime, new_id, utcnow


class FineTuningJob(Base):
    """An OpenAI-style fine-tuning job (service/fine_tuning): the GVPO run that trains it, and
    what the job's body said that a run spec does not hold. Its state is the run's."""

    __tablename__ = "fine_tuning_jobs"
    __table_args__ = (UniqueConstraint("run_id"),)

    id: Mapped[str] = mapped_column(
        String(40), primary_key=True, default=lambda: new_id("ftjob", sep="-")
    )
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    model: Mapped[str] = mapped_column(String(MAX_PATH))  # as the body named it
    training_file: Mapped[str] = mapped_column(String(MAX_ID))
    validation_file: Mapped[str | None] = mapped_column(String(MAX_ID))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    # ("metadata" is taken on a declarative class)
    job_metadata: Mapped[dict[str, str] | None] = mapped_column(JSON)
    # The body's `method` as given, and its hyperparameters with "auto" and the missing ones
    # resolved to the values the run was made with.
    method: Mapped[dict[str, Any]] = mapped_column(JSON)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
