"""A run spec's `environment` and the environment webhook protocol (DESIGN.md §v2.1).

With an environment, each of a group's k samples is an episode: the policy writes an assistant
turn, the environment answers (tool results, a user's reply) until it says `done` or the
episode reaches `max_turns` or `max_episode_tokens`. The environment is either a webhook
(signed POSTs, one per turn of a step carrying every live episode) or a built-in one, named
here with its parameters; the worker's implementations (workers/environments/) implement
exactly these names.
"""

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from service.contract.limits import (
    MAX_ITEMS_PER_REQUEST,
    MAX_TEXT,
    MAX_TOKENS,
    MAX_WEBHOOK_ID,
    Strict,
    params_of,
)
from service.contract.webhooks import Reward

MAX_TURNS = 1_000


class EnvironmentParams(Strict):
    """No parameters (the default)."""


class SecretCodeParams(EnvironmentParams):
    reveal: str = Field(
        "{answer}",
        max_length=MAX_TEXT,
        description="what the environment says after the first turn; {answer} is the row's answer",
    )


class PythonToolParams(EnvironmentParams):
    timeout_s: float = Field(5.0, gt=0, le=300, description="wall time of one tool call")
    cpu_s: int = Field(5, ge=1, le=300, description="CPU seconds of one tool call")
    memory_mb: int = Field(512, ge=16, le=65_536, description="address space of one tool call")
    processes: int = Field(16, ge=1, le=1_024, description="processes one tool call may run")
    file_size_mb: int = Field(16, ge=1, le=4_096, description="largest file it may write")
    max_output_chars: int = Field(4_000, ge=1, le=1_000_000, description="stdout+stderr kept")
    done_without_call: bool = Field(
        True, description="an assistant turn without a tool call ends the episode"
    )


# name -> its parameters (the worker's registry implements exactly these)
BUILTIN_ENVIRONMENTS: dict[str, type[EnvironmentParams]] = {
    "secret_code": SecretCodeParams,
    "python_tool": PythonToolParams,
}


def environment_params(name: str) -> type[EnvironmentParams]:
    try:
        return BUILTIN_ENVIRONMENTS[name]
    except KeyError:
        raise ValueError(
            f"unknown built-in environment {name!r}; known: "
            f"{', '.join(sorted(BUILTIN_ENVIRONMENTS))}"
        ) from None


class _Episodes(Strict):
    max_turns: int = Field(8, ge=1, le=MAX_TURNS, description="assistant turns per episode")
    max_episode_tokens: int = Field(
        4096,
        ge=1,
        le=MAX_TOKENS,
        description="tokens of one episode after its prompt (sampled and environment's); past "
        "it the episode ends truncated",
    )


class WebhookEnvironment(_Episodes):
    type: Literal["webhook"]
    url: str = Field(min_length=1, max_length=2048)
    timeout_s: float = Field(60.0, gt=0, le=3600, description="per request")
    max_attempts: int = Field(5, ge=1, le=20)
    max_items_per_request: int = Field(256, ge=1, le=MAX_ITEMS_PER_REQUEST)


class BuiltinEnvironment(_Episodes):
    type: Literal["builtin"]
    name: str = Field(max_length=MAX_TEXT)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        environment_params(v)
        return v

    @model_validator(mode="after")
    def _params(self) -> "BuiltinEnvironment":
        params_of(self.name, environment_params(self.name), self.params)
        return self

    def parsed_params(self) -> EnvironmentParams:
        return params_of(self.name, environment_params(self.name), self.params)


EnvironmentSpec = Annotated[WebhookEnvironment | BuiltinEnvironment, Field(discriminator="type")]


# -- the webhook protocol --------------------------------------------------------------------


class EpisodeItem(BaseModel):
    episode_id: str  # the same on every send of this turn (deduplicate by it and `turn`)
    group_id: str
    item: dict[str, Any]  # the dataset row's fields other than messages and tools
    messages: list[dict[str, Any]]  # the whole conversation, ending with the new assistant turn


class EnvironmentStep(BaseModel):
    """POSTed to environment.url once per turn of a step (in batches of max_items_per_request),
    carrying every episode still going."""

    type: Literal["environment.step"] = "environment.step"
    request_id: str
    run_id: str
    step: int
    turn: int  # 1 after the policy's first assistant turn
    purpose: Literal["train", "eval", "rescore", "dry_run"] = "train"
    items: list[EpisodeItem]


class EnvironmentMessage(BaseModel):
    role: Literal["tool", "user"]
    content: str
    tool_call_id: str | None = Field(None, max_length=MAX_WEBHOOK_ID * 4)


class EpisodeResult(BaseModel):
    episode_id: str = Field(max_length=MAX_WEBHOOK_ID)
    messages: list[EnvironmentMessage] = Field(default_factory=list, max_length=64)
    done: bool = False
    reward: Reward | None = None  # only with done: else the run's reward scores the episode

    # A field validator, so that the error's location names `reward` (after `done`: it sees it)
    @field_validator("reward")
    @classmethod
    def _reward_when_done(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("done") is False:
            raise ValueError("a reward is given only with done: true")
        return v

    @model_validator(mode="after")
    def _goes_on_with_a_message(self) -> "EpisodeResult":
        if not self.done and not self.messages:
            raise ValueError("an episode that goes on needs at least one message")
        return self


class EnvironmentAnswer(BaseModel):
    results: list[EpisodeResult] = Field(max_length=MAX_ITEMS_PER_REQUEST)
