"""The loss dry-run's request and answer (POST /v1/gvpo:dry_run)."""

from typing import Annotated

from pydantic import BaseModel, Field, model_validator

from service.contract.limits import MAX_BETA, MAX_ID, MAX_PROMPT_CHARS, MAX_REWARD, Strict
from service.contract.tasks import DryRunCompletion

MAX_COMPLETIONS = 64


class DryRunModel(Strict):
    run_id: str = Field(min_length=1, max_length=MAX_ID)
    checkpoint_id: str | None = Field(
        None,
        max_length=MAX_ID,
        description="the run's checkpoint to score with (default: its latest)",
    )


class DryRunRequest(Strict):
    model: DryRunModel = Field(
        description="pi_theta: a run's checkpoint; pi_ref is the model the run started from"
    )
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    completions: list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]] = Field(
        min_length=2, max_length=MAX_COMPLETIONS, description="the group's k completions"
    )
    rewards: list[Annotated[float, Field(ge=-MAX_REWARD, le=MAX_REWARD)]] = Field(
        min_length=2, max_length=MAX_COMPLETIONS, description="one per completion"
    )
    beta: float = Field(0.1, gt=0, le=MAX_BETA)

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
