from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.contract.limits import Strict
from service.contract.rewards import RewardSpec


class RescoreCreate(Strict):
    reward: RewardSpec = Field(description="the new reward, as a run spec's `reward`")


class RescoreRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["rescore"] = "rescore"
    run_id: str
    status: str = Field(description="queued, running, succeeded or failed")
    reward: dict[str, Any]
    samples_total: int
    samples_scored: int = Field(description="progress: samples re-scored so far")
    reward_mean_before: float | None
    reward_mean_after: float | None = Field(description="once it has succeeded")
    file_id: str | None = Field(
        description="once it has succeeded: the run's groups with their new rewards, a file of "
        "purpose offpolicy for a new run's dataset.offpolicy_file"
    )
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class RescoreList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RescoreRead]
