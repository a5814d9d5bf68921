from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# [step, value], or [step, value, time] with with_time (unix seconds; null for a value
# recorded before times were kept). Declared as a list rather than a tuple: FastAPI writes a
# tuple as an array-valued `items`, which OpenAPI 3.1 schema validators reject.
Point = Annotated[list[int | float | None], Field(min_length=2, max_length=3)]


class MetricSeries(BaseModel):
    run_id: str
    metrics: dict[str, list[Point]] = Field(
        description="name -> [[step, value], ...] oldest first ([step, value, time] with_time)"
    )
    downsampled: list[str] = Field(
        default_factory=list,
        description="series that had more than max_points points: each of their points is the "
        "lowest or the highest of a run of steps",
    )


class MetricName(BaseModel):
    name: str
    points: int = Field(description="values recorded")
    first_step: int
    last_step: int


class MetricNameList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MetricName]


class StepMetrics(BaseModel):
    """Every metric recorded at one step (they are written together, with the run's step)."""

    step: int
    values: dict[str, float]


class ReplacedReward(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    reward: float
    rescore_id: str = Field(description="the rescore that replaced it")
    replaced_at: datetime


class EpisodeTurn(BaseModel):
    role: Literal["assistant", "user", "tool"]
    content: str
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    tokens: int = Field(description="its token ids in the episode (sampled, for an assistant turn)")
    trained: bool = Field(
        description="true: the policy sampled these tokens and they carry the loss's "
        "log-ratio; false: the template's and the environment's tokens, masked"
    )


class EpisodeRead(BaseModel):
    """A multi-turn sample: the conversation after its prompt, turn by turn."""

    prompt_messages: list[dict] = Field(
        default_factory=list, description="the row's messages the episode began from"
    )
    turns: list[EpisodeTurn]
    end: Literal["done", "max_turns", "max_episode_tokens"] = Field(
        description="done: the environment ended it; otherwise truncated at that limit"
    )
    trained_tokens: int
    tokens: int


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
    episode: EpisodeRead | None = Field(
        None, description="a multi-turn episode's turns (completion: its last assistant turn)"
    )
    weight: float | None = Field(
        None,
        description="its GVPO weight w_i = (R_i - mean R) - beta*(s_i - mean s) in the step's "
        "loss (null: its group was not trained, or the loss is not GVPO's)",
    )
    logratio: float | None = Field(
        None,
        description="s_i: its summed log pi/pi_ref under the policy before the update that "
        "trained it (null: its group was not trained)",
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
