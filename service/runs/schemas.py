from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class RunRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["run"] = "run"
    name: str | None
    status: str
    step: int
    total_steps: int
    cancel_requested: bool
    tokens_generated: int
    samples_generated: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: dict[str, Any]


class RunCreated(RunRead):
    # Shown once, when the run is created; an idempotent replay carries null (rotate to renew).
    webhook_secret: str | None


class RunList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RunRead]
    has_more: bool
    next_cursor: str | None


class EventRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: datetime
    type: str
    level: str
    message: str
    data: dict[str, Any] | None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventRead]
    has_more: bool


class RunSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str | None
    status: str
    step: int
    total_steps: int
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None


class RunNotification(BaseModel):
    """The body POSTed to a run's notify_url when it ends (service/runs/notify.py)."""

    type: Literal["run.succeeded", "run.failed", "run.cancelled"]
    id: str  # the same on every delivery of this notification: receivers de-duplicate by it
    run_id: str
    created_at: datetime  # when the run ended
    run: RunSummary
