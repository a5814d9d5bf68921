from datetime import datetime

from sqlalchemy import Double, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from service.models.base import Base, UTCDateTime, new_id, utcnow


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("proj"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # The project's own quota (`gvpo quota set`); None = the settings' default (GVPO_QUOTA_*).
    max_concurrent_runs: Mapped[int | None] = mapped_column(Integer)
    max_gpus: Mapped[int | None] = mapped_column(Integer)
    gpu_hours: Mapped[float | None] = mapped_column(Double)
    # When a scheduler last looked at the project's queued runs: written first in each of its
    # passes, so that two passes (two API processes) over one project take turns.
    scheduled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ApiKey(Base):
    """Only a SHA-256 of the key is kept; keys are 256-bit random, so no slow hash is needed."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
