from datetime import date

from sqlalchemy import BigInteger, Date, Double, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from service.models.base import Base


class Usage(Base):
    """What one attempt of a run used on one day (UTC): the worker writes the attempt's totals
    so far after each step and with each heartbeat (absolute figures, so a write done twice
    counts once). An attempt is one worker's hold on the run: a run resumed after its worker
    was lost spends again on the steps it replays, and that is counted, as it was spent.

    Attempt 0 holds what the run's rescores spent (workers/rescore.py): their reward calls,
    added with each step they apply. A rescore holds no training device, so it has no
    device-seconds."""

    __tablename__ = "usage"
    __table_args__ = (Index("ix_usage_project_id_day", "project_id", "day"),)

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    # "gpu" or "cpu": what the attempt's training processes ran on
    device: Mapped[str] = mapped_column(String(8))
    # wall seconds the attempt held the run times its devices (GPUs, or training processes on
    # a CPU worker)
    device_seconds: Mapped[float] = mapped_column(Double, default=0.0)
    tokens_generated: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_trained: Mapped[int] = mapped_column(BigInteger, default=0)
    reward_calls: Mapped[int] = mapped_column(Integer, default=0)
    environment_calls: Mapped[int] = mapped_column(Integer, default=0)


class InferenceUsage(Base):
    """What the OpenAI-compatible endpoints served a project's models (runs and their
    checkpoints) per day (UTC): requests and tokens, as the inference servers counted them.
    Each API process adds what it relayed every few seconds (service/serving/metering.py)."""

    __tablename__ = "inference_usage"
    __table_args__ = (Index("ix_inference_usage_project_id_day", "project_id", "day"),)

    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
