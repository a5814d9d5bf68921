from typing import Any

from sqlalchemy import JSON, Double, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from service.contract.groups import POLICY
from service.models.base import Base
from service.models.rescore import RewardHistory


class Sample(Base):
    __tablename__ = "samples"
    __table_args__ = (UniqueConstraint("run_id", "step", "group_index", "sample_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    group_index: Mapped[int] = mapped_column(Integer)
    sample_index: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    completion: Mapped[str] = mapped_column(Text)
    answer: Mapped[str | None] = mapped_column(Text)
    reward: Mapped[float] = mapped_column(Double)
    # A multi-turn episode's turns and end (service/metrics/schemas.py EpisodeRead); None for
    # a single completion.
    episode: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The index of its prompt's row in the run's training file (None: an off-policy group's):
    # a re-scoring grades with the row's fields again.
    row: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # POLICY (sampled by the run) or an off-policy group's source
    source: Mapped[str] = mapped_column(String(64), server_default=POLICY, default=POLICY)
    # What re-scorings replaced, oldest first.
    reward_history: Mapped[list[RewardHistory]] = relationship(
        order_by=RewardHistory.id, viewonly=True
    )
