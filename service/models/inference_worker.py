from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import JSON, BigInteger, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from service.contract.serving import LiveWorker
from service.models.base import Base, UTCDateTime, utcnow


class InferenceWorker(Base):
    """A `gvpo serve` process, as it last reported itself (workers/serving/): where its control
    server listens and which models it holds. Rows whose heartbeat is older than
    settings.serve_stale_s are workers that have gone."""

    __tablename__ = "inference_workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    url: Mapped[str] = mapped_column(String(512))  # its control server
    # [{"model", "version", "url", "bytes", "last_used"}] of the models it holds
    models: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)  # its budget
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


def live_workers(session: Session, stale_s: float) -> list[LiveWorker]:
    """The inference workers that reported themselves within the last `stale_s` seconds."""
    since = utcnow() - timedelta(seconds=stale_s)
    rows = session.scalars(select(InferenceWorker).where(InferenceWorker.heartbeat_at >= since))
    return [LiveWorker.of_row(row.url, row.models, row.memory_bytes) for row in rows]
