from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Double, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from service.contract.states import RescoreStatus
from service.models.base import Base, UTCDateTime, new_id, utcnow


class Rescore(Base):
    """Re-scoring a finished run's stored samples with another reward (service/rescores)."""

    __tablename__ = "rescores"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("rsc"))
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)  # 1, 2, ... within the run: part of webhook ids
    reward: Mapped[dict[str, Any]] = mapped_column(JSON)  # the reward spec, as validated
    status: Mapped[str] = mapped_column(String(16), default=RescoreStatus.QUEUED, index=True)
    samples_total: Mapped[int] = mapped_column(Integer)
    samples_scored: Mapped[int] = mapped_column(Integer, default=0)
    last_step: Mapped[int] = mapped_column(Integer, default=0)  # steps up to this one are applied
    reward_mean_before: Mapped[float | None] = mapped_column(Double)
    reward_mean_after: Mapped[float | None] = mapped_column(Double)
    file_id: Mapped[str | None] = mapped_column(String(40))  # the re-scored groups, offpolicy
    error: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class RewardHistory(Base):
    """A reward a sample had before a re-scoring replaced it."""

    __tablename__ = "reward_history"
    __table_args__ = (UniqueConstraint("sample_id", "rescore_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"), index=True)
    rescore_id: Mapped[str] = mapped_column(ForeignKey("rescores.id"))  # what replaced it
    reward: Mapped[float] = mapped_column(Double)
    replaced_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
