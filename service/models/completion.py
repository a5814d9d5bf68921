from datetime import datetime

from sqlalchemy import JSON, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from service.models.base import Base, UTCDateTime, new_id, utcnow


class Completion(Base):
    """A completion served with `metadata.gvpo_episode` (DESIGN.md §v2.2): the exact prompt and
    sampled token ids, so that an episode posted to a run (POST /v1/runs/{id}/groups with
    completion ids) trains on what the model saw and sampled, never on a re-tokenisation."""

    __tablename__ = "completions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("cmpl"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    # The run whose weights served it (a run's model, or one of its checkpoints); None for a
    # model that belongs to no run.
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"), index=True)
    model: Mapped[str] = mapped_column(String(64))  # as the request named it
    episode: Mapped[str] = mapped_column(String(200))  # the client's metadata.gvpo_episode
    # The run's step whose weights served it (a checkpoint's step; 0: the starting weights)
    weights_step: Mapped[int | None] = mapped_column(Integer)
    prompt_ids: Mapped[list[int]] = mapped_column(JSON)
    token_ids: Mapped[list[int]] = mapped_column(JSON)
    text: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
