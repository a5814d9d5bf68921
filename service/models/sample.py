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
    # Its GVPO weight w_i = (R_i - mean R) - beta*(s_i - mean s) in the step's loss, and its
    # summed log-ratio s_i = log pi/pi_ref as the learner measured it before its update (None:
    # not trained, e.g. a skipped zero-variance group, or another loss's weight)
    weight: Mapped[float | None] = mapped_column(Double, nullable=True)
    logratio: Mapped[float | None] = mapped_column(Double, nullable=True)
    # What re-scorings replaced, oldest first.
    reward_history: Mapped[list[RewardHistory]] = relationship(
        order_by=RewardHistory.id, viewonly=True
    )
