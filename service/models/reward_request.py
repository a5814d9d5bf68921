from datetime import datetime

from sqlalchemy import JSON, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from service.models.base import Base, UTCDateTime, utcnow


class RewardRequest(Base):
    """One async reward request: the sample ids sent, and the rewards called back so far."""

    __tablename__ = "reward_requests"

    id: Mapped[str] = mapped_column(String(80), primary_key=True)  # the request_id sent
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    sample_ids: Mapped[list[str]] = mapped_column(JSON)
    rewards: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Optimistic concurrency: every UPDATE checks and bumps it, so of two callbacks that read
    # the same rewards and merge their own in, the second one's write fails and it re-reads.
    # (A row lock would do on PostgreSQL; SQLite has none and starts its transaction late.)
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")

    __mapper_args__ = {"version_id_col": version}
