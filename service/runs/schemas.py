from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_json

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
    waiting_reason: str | None = Field(
        None,
        description="while the project's quota holds the queued run back: the limit and why "
        "(`max_concurrent_runs: ...`, `max_gpus: ...`, `gpu_hours: ...`); null otherwise",
    )
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


# RunRead's fields but its spec (run_list_json appends it): a listing writes each run as
# RunRead would.
LISTED_FIELDS = tuple(name for name in RunRead.model_fields if name != "spec")


def run_list_json(rows: list, has_more: bool) -> bytes:
    """RunList's JSON of a page of rows whose spec is the JSON text stored (list_runs'
    spec_as_text), passed through as stored. The rows come from the table, so they are written
    without being validated again (tests/test_api.py checks each equals GET /v1/runs/{id})."""
    items = []
    for row in rows:
        values = {**row._asdict(), "object": "run"}
        head = to_json({name: values[name] for name in LISTED_FIELDS})
        items.append(head[:-1] + b',"spec":' + values["spec"].encode() + b"}")
    next_cursor = rows[-1].id if has_more else None
    return (
        b'{"object":"list","data":['
        + b",".join(items)
        + b"],"
        + to_json({"has_more": has_more, "next_cursor": next_cursor})[1:]
    )


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
