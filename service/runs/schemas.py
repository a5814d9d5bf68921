from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.contract.events import EventLevel, EventType
from service.contract.states import ACTIONS, LIVE, TERMINAL, TRANSITIONS, RunStatus


class RunRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["run"] = "run"
    name: str | None
    status: RunStatus
    step: int
    total_steps: int
    cancel_requested: bool
    tokens_generated: int
    samples_generated: int
    reward: float | None = Field(
        description="the mean reward (metric reward/mean) of the run's last recorded step; "
        "null before its first step"
    )
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
    # A string, not the enum: an event type written by an older or newer version still reads.
    type: str = Field(description="what happened: " + ", ".join(EventType))
    level: EventLevel
    message: str
    data: dict[str, Any] | None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventRead]
    has_more: bool


def _ordered(states) -> list[RunStatus]:
    return [s for s in RunStatus if s in states]


class RunStates(BaseModel):
    """The run state machine (service/contract/states.py), for clients that show or filter
    states without a copy of their own (the dashboard)."""

    object: Literal["run_states"] = "run_states"
    states: list[RunStatus]
    terminal: list[RunStatus] = Field(description="ended: a run in one never changes again")
    live: list[RunStatus] = Field(description="waiting for or held by a worker")
    transitions: dict[RunStatus, list[RunStatus]] = Field(
        description="each state's possible next states"
    )
    actions: dict[str, list[RunStatus]] = Field(
        description="the states in which POST /v1/runs/{id}/<action> is allowed (else 409)"
    )

    @classmethod
    def of_contract(cls) -> "RunStates":
        return cls(
            states=list(RunStatus),
            terminal=_ordered(TERMINAL),
            live=_ordered(LIVE),
            transitions={s: _ordered(targets) for s, targets in TRANSITIONS.items()},
            actions={action: _ordered(states) for action, states in ACTIONS.items()},
        )
