from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, Session, mapped_column

from service.contract.events import EventLevel, EventType
from service.models.base import Base, UTCDateTime, utcnow


class RunEvent(Base):
    __tablename__ = "run_events"

    # An integer id gives the event log a total order and a cheap `?after=` cursor.
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    type: Mapped[str] = mapped_column(String(64))
    level: Mapped[str] = mapped_column(String(16), default=EventLevel.INFO)
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)


def add_event(
    session: Session,
    run_id: str,
    type_: EventType,
    message: str,
    level: EventLevel = EventLevel.INFO,
    data: dict[str, Any] | None = None,
) -> None:
    """Record an event of the run in the session's transaction (the API's and the workers')."""
    session.add(RunEvent(run_id=run_id, type=type_, message=message, level=level, data=data))
