from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Integer, String, UniqueConstraint, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from service.contract.storage import CheckpointKind
from service.models.base import Base, UTCDateTime, new_id, utcnow


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "step"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ckpt"))
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(1024))
    bytes: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(
        String(16), default=CheckpointKind.FULL, server_default=CheckpointKind.FULL
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


def newest_checkpoint(session: Session, run_id: str) -> Checkpoint | None:
    """The run's checkpoint of the highest step, if it has one."""
    return session.scalars(
        select(Checkpoint)
        .where(Checkpoint.run_id == run_id)
        .order_by(Checkpoint.step.desc())
        .limit(1)
    ).first()
