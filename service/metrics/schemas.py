from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# [step, value]. Declared as a 2-item list rather than a tuple: FastAPI writes a tuple as an
# array-valued `items`, which OpenAPI 3.1 schema validators reject.
Point = Annotated[list[int | float], Field(min_length=2, max_length=2)]


class MetricSeries(BaseModel):
    run_id: str
    metrics: dict[str, list[Point]] = Field(description="name -> [[step, value], ...]")


class StepMetrics(BaseModel):
    """Every metric recorded at one step (they are written together, with the run's step)."""

    step: int
    values: dict[str, float]


class ReplacedReward(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    reward: float
    rescore_id: str = Field(description="the rescore that replaced it")
    replaced_at: datetime


class SampleRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    step: int
    group_index: int
    sample_index: int
    prompt: str
    completion: str
    answer: str | None
    reward: float
    source: str = Field(
        description='"policy": sampled by the run; else the off-policy group\'s source'
    )
    reward_history: list[ReplacedReward] = Field(
        default_factory=list,
        description="rewards that re-scorings replaced, oldest first (the "
        "first is the one the run trained on)",
    )


class SampleList(BaseModel):
    object: Literal["list"] = "list"
    step: int | None
    data: list[SampleRead]
