"""POST /v1/graders:run and /v1/graders:validate (also at OpenAI's paths,
/v1/fine_tuning/alpha/graders/run and /validate): OpenAI's request and answer shapes, so that
the official SDK's `client.fine_tuning.alpha.graders.run(...)` and `.validate(...)` work as
they are. The graders are the contract's (service/contract/graders.py)."""

from typing import Any

from pydantic import BaseModel, Field

from service.contract.graders import AnyGrader
from service.contract.limits import MAX_PROMPT_CHARS, Strict


class GraderValidateRequest(Strict):
    grader: AnyGrader


class GraderValidateResponse(BaseModel):
    grader: dict[str, Any] = Field(description="the grader as it will be used: defaults filled in")


class GraderRunRequest(Strict):
    grader: AnyGrader
    model_sample: str = Field(
        max_length=MAX_PROMPT_CHARS,
        description="the completion to grade: the `sample` namespace (output_json when it is JSON)",
    )
    item: dict[str, Any] = Field(
        default_factory=dict, description="the dataset row: the `item` namespace"
    )


class GraderRunErrors(BaseModel):
    """OpenAI's metadata.errors: which kind of error the grading met (at most one is true)."""

    formula_parse_error: bool = False
    invalid_variable_error: bool = False
    model_grader_parse_error: bool = False
    model_grader_refusal_error: bool = False
    model_grader_server_error: bool = False
    model_grader_server_error_details: str | None = None
    other_error: bool = False
    python_grader_runtime_error: bool = False
    python_grader_runtime_error_details: str | None = None
    python_grader_server_error: bool = False
    python_grader_server_error_type: str | None = None
    sample_parse_error: bool = False
    truncated_observation_error: bool = False
    unresponsive_reward_error: bool = False


class GraderRunMetadata(BaseModel):
    name: str
    type: str
    errors: GraderRunErrors
    execution_time: float = Field(description="seconds the grading took on the worker")
    scores: dict[str, Any] = Field(description="a multi grader's graders' rewards, by name")
    token_usage: int | None = Field(description="tokens a judge (score_model) used")
    sampled_model_name: str | None = Field(description="the judge model that answered")
    detail: str | None = Field(None, description="(ours) what the error was, for people")


class GraderRunResponse(BaseModel):
    reward: float
    metadata: GraderRunMetadata
    sub_rewards: dict[str, Any]
    model_grader_token_usage_per_model: dict[str, Any] = Field(
        description="judge model -> {prompt_tokens, completion_tokens, total_tokens}"
    )
