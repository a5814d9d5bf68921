from datetime import date
from typing import Literal

from pydantic import BaseModel, Field


class UsageFigures(BaseModel):
    """What runs used (service/models/usage.py): device time and the work it did."""

    gpu_seconds: float = Field(0.0, description="GPUs held times wall seconds, on GPU workers")
    cpu_seconds: float = Field(
        0.0, description="training processes times wall seconds, on CPU workers"
    )
    tokens_generated: int = Field(0, description="completion tokens the run's engines sampled")
    tokens_trained: int = Field(0, description="completion tokens of the groups trained")
    reward_calls: int = Field(0, description="requests sent to reward webhooks, retries included")
    environment_calls: int = Field(
        0, description="requests sent to environment webhooks, retries included"
    )
    inference_requests: int = Field(
        0, description="requests the OpenAI-compatible endpoints served of the runs' models"
    )
    inference_prompt_tokens: int = Field(0, description="their prompt tokens")
    inference_completion_tokens: int = Field(0, description="their completion tokens")


class UsageRow(UsageFigures):
    day: date | None = Field(None, description="with group_by=day: the day (UTC)")
    run_id: str | None = Field(None, description="with group_by=run: the run")


class QuotaRead(BaseModel):
    max_concurrent_runs: int | None = Field(description="null: no limit")
    max_gpus: int | None = Field(description="devices the project's started runs may hold")
    gpu_hours: float | None = Field(description="device-hours the project may spend in all")
    gpu_hours_used: float = Field(description="device-hours the project's runs have used")


class UsageReport(BaseModel):
    object: Literal["usage"] = "usage"
    group_by: Literal["day", "run"]
    data: list[UsageRow]
    total: UsageFigures
    quota: QuotaRead


class RunUsage(BaseModel):
    object: Literal["run.usage"] = "run.usage"
    run_id: str
    attempts: int = Field(description="how many times a worker took the run")
    total: UsageFigures
    by_day: list[UsageRow]


class Estimate(BaseModel):
    object: Literal["run.estimate"] = "run.estimate"
    steps: int
    completions: int = Field(description="steps x prompts_per_step x group_size")
    tokens_generated_max: int = Field(
        description="completions x sampling.max_new_tokens (evaluation not included)"
    )
    devices: int = Field(description="the devices the run holds: GPUs, or training processes")
    device_hours: float | None = Field(
        description="at most, at the device time per generated token the project's ended runs "
        "of the same model took (null: none to go by)"
    )
    basis: str = Field(description="how device_hours was reached, or why it is null")
    quota: QuotaRead
    fits_budget: bool | None = Field(
        description="whether device_hours fits what is left of the budget (null: no budget, "
        "or no estimate)"
    )
