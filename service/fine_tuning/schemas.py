"""OpenAI's fine-tuning job shapes (the `openai` SDK's types/fine_tuning): the body of
POST /v1/fine_tuning/jobs, and the job, event and checkpoint objects the routes answer with.

The request is parsed as OpenAI's SDK sends it. A `supervised` or `dpo` method (or the deprecated
top-level `hyperparameters`, which means supervised) parses, so that the service can refuse it
with a message of its own rather than a schema error; the reinforcement method's grader is one
of the contract's graders (service/contract/graders.py). What each field maps to in the run:
docs/fine-tuning.md.
"""

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from service.contract.graders import AnyGrader
from service.contract.limits import (
    INT32_MAX,
    MAX_GROUP_SIZE,
    MAX_ID,
    MAX_PATH,
    MAX_PROMPTS_PER_STEP,
    MAX_STEPS,
    Strict,
)
from service.contract.states import RunStatus

Auto = Literal["auto"]
MAX_METADATA_KEYS = 16  # OpenAI's limits on metadata
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_SUFFIX = 64
MAX_MULTIPLIER = 1e4


# A job's status: its run's (service/fine_tuning/service.py job_status), and OpenAI's
# `pausing` (a running run asked to pause) and `validating_files`, which is never answered: the
# files are checked when the job is created. OpenAI's API lists `pausing` and `paused`; its
# Python SDK's type leaves them out and keeps them as they come.
JobStatus = StrEnum(
    "JobStatus",
    [("VALIDATING_FILES", "validating_files"), ("PAUSING", "pausing")]
    + [(status.name, status.value) for status in RunStatus],
)


# ---------------------------------------------------------------- the request


class ReinforcementHyperparameters(Strict):
    """Each may be "auto" (or left out): what it resolves to is in docs/fine-tuning.md."""

    batch_size: Auto | Annotated[int, Field(ge=1, le=MAX_PROMPTS_PER_STEP)] | None = Field(
        None, description="prompts per step (training.prompts_per_step), one update per step"
    )
    compute_multiplier: Auto | Annotated[float, Field(gt=0, le=MAX_MULTIPLIER)] | None = Field(
        None, description="scales the completions sampled per prompt (algorithm.group_size, 8)"
    )
    eval_interval: Auto | Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = Field(
        None, description="steps between evaluations and checkpoints"
    )
    eval_samples: Auto | Annotated[int, Field(ge=1, le=MAX_GROUP_SIZE)] | None = Field(
        None, description="completions sampled per validation prompt"
    )
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=MAX_MULTIPLIER)] | None = (
        Field(None, description="times the base learning rate (optimizer.lr, 1e-6)")
    )
    n_epochs: Auto | Annotated[int, Field(ge=1, le=MAX_STEPS)] | None = Field(
        None, description="passes over the training file (sets training.steps)"
    )
    reasoning_effort: Literal["default", "low", "medium", "high"] | None = Field(
        None, description="the completion length budget (sampling.max_new_tokens)"
    )


class ReinforcementMethod(Strict):
    grader: AnyGrader
    hyperparameters: ReinforcementHyperparameters | None = None


class Method(Strict):
    type: Literal["supervised", "dpo", "reinforcement"]
    # Parsed as anything: such a job is refused with a message saying why.
    supervised: dict[str, Any] | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: ReinforcementMethod | None = None


MetadataKey = Annotated[str, Field(max_length=MAX_METADATA_KEY)]
MetadataValue = Annotated[str, Field(max_length=MAX_METADATA_VALUE)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_KEYS)]


class JobCreate(Strict):
    """POST /v1/fine_tuning/jobs: OpenAI's body (the SDK's JobCreateParams)."""

    model: str = Field(
        min_length=1,
        max_length=MAX_PATH,
        description="a base model registered with the service (gvpo models add), a model "
        "folder under its model roots, a hub id (org/name), or a checkpoint of the project "
        "(ckpt_…) to go on training",
    )
    training_file: str = Field(
        min_length=1, max_length=MAX_ID, description="a file of purpose fine-tune"
    )
    validation_file: str | None = Field(
        None, min_length=1, max_length=MAX_ID, description="a file of purpose fine-tune"
    )
    method: Method | None = Field(None, description="only `reinforcement` is trained here")
    hyperparameters: dict[str, Any] | None = Field(
        None, description="deprecated by OpenAI, and for supervised jobs: refused"
    )
    integrations: list[dict[str, Any]] | None = Field(
        None, max_length=16, description="none is supported: a non-empty list is refused"
    )
    metadata: Metadata | None = None
    seed: int | None = Field(None, ge=0, le=INT32_MAX, description="default: a random one")
    suffix: str | None = Field(
        None, min_length=1, max_length=MAX_SUFFIX, description="the run's name"
    )


# ---------------------------------------------------------------- the answers


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class LegacyHyperparameters(BaseModel):
    """OpenAI's top-level `hyperparameters` of a job: here the reinforcement method's, resolved."""

    batch_size: int | None = None
    learning_rate_multiplier: float | None = None
    n_epochs: int | None = None


class JobRead(BaseModel):
    """OpenAI's `fine_tuning.job`, plus `run_id` (ours): the run that trains it."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int = Field(description="Unix seconds")
    error: JobError | None
    fine_tuned_model: str | None = Field(
        description="once succeeded: the run's final checkpoint (ckpt_…), a model name for "
        "/v1/chat/completions"
    )
    finished_at: int | None
    hyperparameters: LegacyHyperparameters
    model: str
    organization_id: str = Field(description="the project's id")
    result_files: list[str]
    seed: int
    status: JobStatus
    trained_tokens: int | None = Field(
        description="once ended: the tokens of the completions the run sampled and trained on"
    )
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    integrations: list[dict[str, Any]]
    metadata: dict[str, str] | None
    method: dict[str, Any] = Field(
        description='the method as given, its hyperparameters resolved ("auto" replaced)'
    )
    run_id: str = Field(description="(ours) the GVPO run: GET /v1/runs/{run_id}")


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobRead]
    has_more: bool


class JobEvent(BaseModel):
    """OpenAI's `fine_tuning.job.event`: one of the run's events."""

    id: str = Field(description="ftevent-<the run event's id>")
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None = Field(
        description="the run event's data, and its `gvpo_type` (run.started, checkpoint.saved…)"
    )
    type: Literal["message", "metrics"] = "message"


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool


class CheckpointMetrics(BaseModel):
    """The run's metrics at the checkpoint's step; OpenAI's supervised fields have no
    counterpart in reinforcement learning and are left out."""

    step: float
    train_loss: float | None = Field(None, description="the metric loss")
    train_reward_mean: float | None = Field(None, description="(ours) the metric reward/mean")
    valid_reward_mean: float | None = Field(
        None, description="(ours) the metric eval/reward_mean, where the step was evaluated"
    )


class JobCheckpoint(BaseModel):
    """OpenAI's `fine_tuning.job.checkpoint`: one of the run's checkpoints."""

    id: str = Field(description="the checkpoint's id (ckpt_…)")
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str = Field(
        description="the same id: a model name for /v1/chat/completions"
    )
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


class JobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobCheckpoint]
    has_more: bool
    first_id: str | None
    last_id: str | None
