from typing import Literal

from pydantic import BaseModel, ConfigDict


class MetricSeries(BaseModel):
    run_id: str
    metrics: dict[str, list[tuple[int, float]]]


class SampleRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    step: int
    group_index: int
    sample_index: int
    prompt: str
    completion: str
    answer: str | None
    reward: float


class SampleList(BaseModel):
    object: Literal["list"] = "list"
    step: int | None
    data: list[SampleRead]
