"""The bodies of the webhook protocol (DESIGN.md): what the worker sends a reward model, what the
reward model answers or calls back with, and the notification a run's notify_url receives.

Every body is signed as gvpo_client.signing says. The worker builds its requests from
these models; receivers (a reward model written in Python, the tests) can validate with them.
"""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.contract.events import EventType
from service.contract.limits import MAX_ITEMS_PER_REQUEST, MAX_WEBHOOK_ID
from service.contract.states import RunStatus

# A reward in either direction: a finite JSON number, not a boolean (signing.is_reward).
Reward = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class RewardItem(BaseModel):
    """One completion to score."""

    sample_id: str  # the same on every send of this completion (deduplicate by it)
    group_id: str
    prompt: str
    completion: str  # a chat row's: the assistant's text; an episode's: its last assistant turn
    answer: str | None
    # Chat rows: the whole conversation, ending with the policy's turn (an episode's: every
    # turn, environment messages included); None for a plain prompt.
    messages: list[dict[str, Any]] | None = None
    item: dict[str, Any] | None = None  # a chat row's other fields


class RewardRequest(BaseModel):
    """POSTed to reward.url, one per batch of at most max_items_per_request completions."""

    type: Literal["reward.request"] = "reward.request"
    request_id: str  # also in the GVPO-Request-Id header
    run_id: str
    step: int
    purpose: Literal["train", "eval", "rescore"]
    callback_url: str  # async mode: where to POST a RewardCallback
    items: list[RewardItem]


class RewardValue(BaseModel):
    # Reward models are other people's code: fields of their own are ignored, not refused.
    sample_id: str = Field(max_length=MAX_WEBHOOK_ID)
    reward: Reward


class RewardAnswer(BaseModel):
    """A sync reward model's 200 body: a reward for every item of the request."""

    rewards: list[RewardValue] = Field(max_length=MAX_ITEMS_PER_REQUEST)


class RewardCallback(RewardAnswer):
    """An async reward model's later POST to callback_url: all or part of a request's rewards."""

    request_id: str = Field(max_length=MAX_WEBHOOK_ID)


class RunSummary(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str | None
    status: RunStatus
    step: int
    total_steps: int
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None


class RunNotification(BaseModel):
    """POSTed to a run's notify_url once it has ended (service/runs/notify.py)."""

    type: Literal[EventType.RUN_SUCCEEDED, EventType.RUN_FAILED, EventType.RUN_CANCELLED]
    id: str  # the same on every delivery of this notification: receivers de-duplicate by it
    run_id: str
    created_at: datetime  # when the run ended
    run: RunSummary
