"""The API's answers as the client returns them: plain dicts parsed from JSON, declared here as
TypedDicts for type checkers and editors. Field for field they are the API's schemas
(service/*/schemas.py, and the REST reference of the manual); times are ISO 8601 strings.

A newer server may add fields; nothing here rejects them, since nothing is checked at run time.
"""

from typing import Any, Literal, TypedDict


class File(TypedDict):
    """POST /v1/files, GET /v1/files/{id}: an uploaded JSONL file."""

    id: str
    object: Literal["file"]
    filename: str
    purpose: str  # train, eval, offpolicy or fine-tune
    bytes: int
    rows: int
    fields: list[str]  # the keys of its rows
    created_at: str
    status: Literal["processed"]  # for OpenAI's SDK: an upload is checked before it is recorded
    status_details: None
    expires_at: None


class Run(TypedDict):
    """GET /v1/runs/{id}: a run and where it stands."""

    id: str
    object: Literal["run"]
    name: str | None
    status: str  # one of GET /v1/run-states' states; TERMINAL holds those it never leaves
    step: int  # steps finished
    total_steps: int
    cancel_requested: bool
    tokens_generated: int
    samples_generated: int
    reward: float | None  # the mean reward (reward/mean) of its last recorded step
    error: str | None  # why it failed
    waiting_reason: str | None  # while the project's quota holds the queued run back: why
    created_at: str
    started_at: str | None
    finished_at: str | None
    spec: dict[str, Any]  # the run spec as the API completed it with its defaults


class RunCreated(Run):
    """POST /v1/runs: the run, and once only the secret its webhooks are signed with (null on an
    idempotent replay)."""

    webhook_secret: str | None


class RunList(TypedDict):
    """GET /v1/runs: a page of runs, newest first; pass next_cursor as `after` for the next."""

    object: Literal["list"]
    data: list[Run]
    has_more: bool
    next_cursor: str | None


class Event(TypedDict):
    """GET /v1/runs/{id}/events: one thing that happened to a run."""

    id: int  # increasing: the stream resumes after the last one seen
    created_at: str
    type: str  # run.queued, run.model_loaded, checkpoint.saved, ...
    level: str  # info, warning or error
    message: str
    data: dict[str, Any] | None


class StepMetrics(TypedDict):
    """A finished step's metrics, as Client.follow streams them."""

    step: int
    values: dict[str, float]


# GET /v1/runs/{id}/metrics: name -> [[step, value], ...] ([step, value, time] with_time),
# oldest step first.
Metrics = dict[str, list[list[float]]]


class MetricName(TypedDict):
    """GET /v1/runs/{id}/metrics/names: a series the run has recorded."""

    name: str
    points: int
    first_step: int
    last_step: int


class ReplacedReward(TypedDict):
    reward: float
    rescore_id: str  # the rescore that replaced it
    replaced_at: str


class EpisodeTurn(TypedDict):
    role: Literal["assistant", "user", "tool"]
    content: str
    tool_calls: list[dict[str, Any]] | None
    tool_call_id: str | None
    tokens: int  # its token ids in the episode (sampled, for an assistant turn)
    trained: bool  # the policy sampled these tokens (the loss's); else masked


class Episode(TypedDict):
    """A multi-turn sample: the conversation after its prompt, turn by turn."""

    prompt_messages: list[dict[str, Any]]  # the row's messages the episode began from
    turns: list[EpisodeTurn]
    end: Literal["done", "max_turns", "max_episode_tokens"]  # done: the environment ended it
    trained_tokens: int
    tokens: int


class Sample(TypedDict):
    step: int
    group_index: int
    sample_index: int
    prompt: str
    completion: str
    answer: str | None
    reward: float
    source: str  # "policy": sampled by the run; else the off-policy group's source
    episode: Episode | None  # a multi-turn episode's turns (completion: its last assistant turn)
    weight: float | None  # its GVPO weight w_i in the step's loss (None: not trained)
    logratio: float | None  # its summed log pi/pi_ref s_i (None: not trained)
    reward_history: list[ReplacedReward]  # rewards re-scorings replaced, oldest first


class Samples(TypedDict):
    """GET /v1/runs/{id}/samples: one step's samples (the latest step's when none is named)."""

    object: Literal["list"]
    step: int | None  # None: the run has no sample yet
    data: list[Sample]


class Checkpoint(TypedDict):
    """GET /v1/runs/{id}/checkpoints: a saved model."""

    id: str
    object: Literal["checkpoint"]
    run_id: str
    step: int
    bytes: int
    kind: str  # "full": a whole model; "lora_adapter": an adapter over the run's model.path
    created_at: str


class DownloadLink(TypedDict):
    url: str  # path and query on the API's origin; GET it without an API key
    expires_at: str


class GroupsStatus(TypedDict):
    """POST /v1/runs/{id}/groups: what became of posted off-policy groups."""

    object: Literal["run.groups"]
    run_id: str
    accepted: int  # groups this request added
    pending: int  # posted groups no step has taken yet
    trained: int  # posted groups taken by a step
    slots_per_step: int


class Rescore(TypedDict):
    """POST /v1/runs/{id}/rescore, GET /v1/runs/{id}/rescores/{rescore}: a finished run's
    samples scored again with another reward."""

    id: str
    object: Literal["rescore"]
    run_id: str
    status: str  # queued, running, succeeded or failed
    reward: dict[str, Any]
    samples_total: int
    samples_scored: int
    reward_mean_before: float | None
    reward_mean_after: float | None
    file_id: str | None  # once succeeded: the groups with their new rewards (purpose offpolicy)
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None


class UsageFigures(TypedDict):
    """What runs used: device time (GPU-seconds; process-seconds on CPU workers) and work."""

    gpu_seconds: float
    cpu_seconds: float
    tokens_generated: int
    tokens_trained: int
    reward_calls: int  # requests sent to reward webhooks, retries included
    environment_calls: int
    inference_requests: int  # requests the OpenAI-compatible endpoints served of the models
    inference_prompt_tokens: int
    inference_completion_tokens: int


class UsageRow(UsageFigures):
    day: str | None  # group_by=day: the day (UTC)
    run_id: str | None  # group_by=run: the run


class Quota(TypedDict):
    """A project's quota (null: no limit) and the device-hours its runs have used."""

    max_concurrent_runs: int | None
    max_gpus: int | None
    gpu_hours: float | None
    gpu_hours_used: float


class Usage(TypedDict):
    """GET /v1/usage."""

    object: Literal["usage"]
    group_by: Literal["day", "run"]
    data: list[UsageRow]
    total: UsageFigures
    quota: Quota


class RunUsage(TypedDict):
    """GET /v1/runs/{id}/usage: every attempt of the run, in all and per day."""

    object: Literal["run.usage"]
    run_id: str
    attempts: int
    total: UsageFigures
    by_day: list[UsageRow]


class Estimate(TypedDict):
    """POST /v1/runs:estimate: what a spec would use at most."""

    object: Literal["run.estimate"]
    steps: int
    completions: int
    tokens_generated_max: int
    devices: int
    device_hours: float | None  # null: no ended run of the same model to go by
    basis: str
    quota: Quota
    fits_budget: bool | None
