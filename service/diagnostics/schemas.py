"""The loss dry-run's request and answer (POST /v1/gvpo:dry_run)."""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.contract.tasks import DryRunCompletion

MAX_COMPLETIONS = 64


class DryRunModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(min_length=1, max_length=100)
    checkpoint_id: str | None = Field(
        None, max_length=100, description="the run's checkpoint to score with (default: its latest)"
    )


class DryRunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: DryRunModel = Field(
        description="pi_theta: a run's checkpoint; pi_ref is the model the run started from"
    )
    prompt: str = Field(min_length=1, max_length=100_000)
    completions: list[str] = Field(
        min_length=2, max_length=MAX_COMPLETIONS, description="the group's k completions"
    )
    rewards: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(
        min_length=2, max_length=MAX_COMPLETIONS, description="one per completion"
    )
    beta: float = Field(0.1, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_reward_each(self) -> "DryRunRequest":
        if len(self.rewards) != len(self.completions):
            raise ValueError(
                f"{len(self.rewards)} rewards for {len(self.completions)} "
                "completions: give one reward per completion"
            )
        return self


class DryRunResult(BaseModel):
    run_id: str
    checkpoint_id: str
    step: int = Field(description="the checkpoint's step")
    beta: float
    reward_mean: float
    log_ratio_mean: float
    loss: float = Field(description="1/2 * sum_i [beta*(s_i - mean s) - (R_i - mean R)]^2 / (k-1)")
    completions: list[DryRunCompletion]
