"""The loss dry-run's request and answer (POST /v1/gvpo:dry_run). A group comes in either form
of an off-policy group (service/contract/groups.py): a prompt and completions as text, or chat
messages and episodes, whose assistant messages are what carries the loss."""

from typing import Annotated, Any

from pydantic import BaseModel, Field, model_validator

from service.contract.chat import chat_problem
from service.contract.groups import episodes_problem
from service.contract.limits import MAX_BETA, MAX_ID, MAX_PROMPT_CHARS, MAX_REWARD, Strict
from service.contract.tasks import DryRunCompletion

MAX_COMPLETIONS = 64
MAX_MESSAGES = 1000  # in a prompt, or in an episode
MAX_TOOLS = 256


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
    prompt: str | None = Field(
        None, min_length=1, max_length=MAX_PROMPT_CHARS, description="text form: the prompt"
    )
    completions: list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]] | None = Field(
        None,
        min_length=2,
        max_length=MAX_COMPLETIONS,
        description="text form: the group's k completions",
    )
    messages: list[dict[str, Any]] | None = Field(
        None, min_length=1, max_length=MAX_MESSAGES, description="chat form: the prompt's messages"
    )
    tools: list[dict[str, Any]] | None = Field(
        None,
        max_length=MAX_TOOLS,
        description="chat form: the tools the prompt offers (OpenAI function schemas)",
    )
    episodes: list[Annotated[list[dict[str, Any]], Field(max_length=MAX_MESSAGES)]] | None = Field(
        None,
        min_length=2,
        max_length=MAX_COMPLETIONS,
        description="chat form: the group's k episodes, each the messages after the prompt, "
        "starting and ending with an assistant message; only assistant tokens carry the loss",
    )
    rewards: list[Annotated[float, Field(ge=-MAX_REWARD, le=MAX_REWARD)]] = Field(
        min_length=2, max_length=MAX_COMPLETIONS, description="one per completion or episode"
    )
    beta: float = Field(0.1, gt=0, le=MAX_BETA)

    @model_validator(mode="after")
    def _one_form(self) -> "DryRunRequest":
        text = self.prompt is not None or self.completions is not None
        chat = self.messages is not None or self.episodes is not None or self.tools is not None
        if text == chat:
            raise ValueError(
                "give the group as text ('prompt' and 'completions') or as chat ('messages' "
                "and 'episodes')" + (", not both" if text else "")
            )
        if text and (self.prompt is None or self.completions is None):
            raise ValueError("a group as text needs both 'prompt' and 'completions'")
        if chat and (self.messages is None or self.episodes is None):
            raise ValueError("a group as chat needs both 'messages' and 'episodes'")
        if chat and (problem := chat_problem({"messages": self.messages, "tools": self.tools})):
            raise ValueError(problem)
        if chat and (problem := episodes_problem(self.episodes)):
            raise ValueError(problem)
        k, noun = (len(self.episodes), "episode") if chat else (len(self.completions), "completion")
        if len(self.rewards) != k:
            raise ValueError(
                f"{len(self.rewards)} rewards for {k} {noun}s: give one reward per {noun}"
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
