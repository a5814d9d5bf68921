from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer
from sqlalchemy.orm import Mapped, mapped_column

from service.models.base import Base, UTCDateTime, utcnow


class RunGroup(Base):
    """A group of completions posted to a running run (POST /v1/runs/{id}/groups); it fills the
    run's off-policy slots, oldest first, at the step that takes it."""

    __tablename__ = "run_groups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)  # a validated off-policy group row
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # The step that trained it; a step replayed after a resume takes the same groups again.
    taken_step: Mapped[int | None] = mapped_column(Integer)
