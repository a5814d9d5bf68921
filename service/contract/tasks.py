"""How the API hands work to the workers: the broker, the task names and what each task takes
and answers.

The API only publishes tasks by name (it never imports the worker's code); the workers register
functions under these names (workers/tasks.py). Both build their Celery app with `celery_app`,
from the same settings, so they agree on the broker, the result backend and the queues.

- RUN_TASK and RESCORE_TASK take a row's id and report through the database (the row's status,
  events and metrics); their results are ignored.
- GANG_TASK: a worker that took a run spanning several machines (resources.nodes) asks the
  other workers of its queue to join it, with a `GangTask` each (workers/gang.py).
- DRY_RUN_TASK, MERGE_TASK and GRADE_TASK answer a request the API is waiting on: they take a
  JSON payload and return a `TaskAnswer`, through the result backend.

acks_late + prefetch 1: a run's message is acknowledged only when the task returns, and a worker
never reserves a second task while one is running.
"""

import os
import time
import uuid
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, Protocol

from celery import Celery
from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import dumps
from pydantic import BaseModel, Field

from service.contract.graders import AnyGrader
from service.contract.storage import CheckpointKind

RUN_TASK = "gvpo.run"
RESCORE_TASK = "gvpo.rescore"
DRY_RUN_TASK = "gvpo.dry_run"
MERGE_TASK = "gvpo.merge_checkpoint"
GRADE_TASK = "gvpo.grade"
GANG_TASK = "gvpo.join_gang"
DEFAULT_QUEUE = "default"
RESULT_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0.2,
    "interval_step": 0.5,
    "interval_max": 1.0,
}


class BrokerSettings(Protocol):
    """What the broker needs of the settings (service.config.Settings has it)."""

    broker_url: str
    result_backend: str | None

    @property
    def broker_dir(self) -> Path: ...


def result_backend_url(settings: BrokerSettings) -> str | None:
    """Where answers to waiting requests go: the setting, else next to the broker (Redis: the
    same server; the file broker: a folder beside it; AMQP: reply queues)."""
    if settings.result_backend:
        return settings.result_backend
    url = settings.broker_url
    if url.startswith(("redis://", "rediss://")):
        return url
    if url.startswith("filesystem://"):
        return (settings.broker_dir / "results").as_uri()
    if url.startswith(("amqp://", "pyamqp://")):
        return "rpc://"
    return None


class _AtomicChannel(filesystem.Channel):
    """kombu's filesystem channel, except that a message is written under a name no reader
    takes (`.part`) and renamed into the queue: kombu's own writes the queue's file in place,
    and a worker that lists it half-written dies on the JSONDecodeError (seen under load)."""

    def _put(self, queue, payload, **kwargs):
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        try:
            with open(final + PARTIAL, "wb") as f:
                f.write(dumps(payload).encode())
            os.replace(final + PARTIAL, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class AtomicFilesystemTransport(filesystem.Transport):
    Channel = _AtomicChannel


PARTIAL = ".part"  # a message being written: _get takes only names ending in .<queue>.msg


def _filesystem_options(broker_dir: Path) -> dict:
    # kombu's filesystem transport needs its folders made first, and in == out for one machine.
    queue_dir, processed, control = (
        broker_dir / name for name in ("queue", "processed", "control")
    )
    for folder in (queue_dir, processed, control):
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(queue_dir),
        "data_folder_out": str(queue_dir),
        "processed_folder": str(processed),
        "store_processed": False,
        "control_folder": str(control),
    }


def celery_app(settings: BrokerSettings, include: tuple[str, ...] = ()) -> Celery:
    """A Celery app for `settings`' broker; `include`: the modules that define tasks (the
    worker's), none for a process that only publishes (the API)."""
    backend = result_backend_url(settings)
    app = Celery("gvpo", broker=settings.broker_url, backend=backend, include=list(include))
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,  # the tasks that answer say so themselves
        task_default_queue=DEFAULT_QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        result_expires=3600,
        # A waiting request fails fast (503) when the result store is down, not after Celery's
        # default 20 reconnections.
        result_backend_transport_options={"retry_policy": RESULT_RETRY_POLICY},
    )
    if settings.broker_url.startswith("filesystem"):
        app.conf.broker_transport = AtomicFilesystemTransport
        app.conf.broker_transport_options = _filesystem_options(settings.broker_dir)
    if backend and backend.startswith("file://"):  # Celery expects the folder to be there
        Path(backend.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
    return app


@lru_cache(maxsize=4)
def _cached(broker_url: str, result_backend: str | None, broker_dir: Path) -> Celery:
    return celery_app(
        SimpleNamespace(broker_url=broker_url, result_backend=result_backend, broker_dir=broker_dir)
    )


def publisher(settings: BrokerSettings) -> Celery:
    """The one Celery app of a publishing process (the API) for these settings."""
    return _cached(settings.broker_url, settings.result_backend, settings.broker_dir)


def queue_of(spec: dict[str, Any]) -> str:
    """The Celery queue of a stored run spec (every default is filled in when it is stored)."""
    return spec.get("resources", {}).get("queue", DEFAULT_QUEUE)


class TaskProblem(BaseModel):
    """Why a task that answers a request could not do it, in terms the API can pass on:
    `conflict` (409: the request cannot be met in the run's state, such as a model that does
    not load) or `invalid` (422: the request itself, `fields` naming what)."""

    kind: Literal["conflict", "invalid"]
    message: str
    fields: list[dict[str, str]] = Field(default_factory=list)


class TaskAnswer(BaseModel):
    """What DRY_RUN_TASK, MERGE_TASK and GRADE_TASK return: a result, or the problem that
    stopped them."""

    result: dict[str, Any] | None = None
    problem: TaskProblem | None = None


class DryRunTask(BaseModel):
    """DRY_RUN_TASK's payload: one group under a checkpoint (pi_theta) and the run's starting
    model (pi_ref); the API has checked that both belong to the caller's project."""

    checkpoint_id: str
    checkpoint_path: str  # a local folder or a URL in the checkpoint store
    checkpoint_kind: CheckpointKind
    base_model: str  # the run's model.path: pi_ref, and a LoRA checkpoint's base
    prompt: str | None = None  # a group as text
    completions: list[str] | None = None
    messages: list[dict[str, Any]] | None = None  # a group as chat (rendered by chat_template)
    tools: list[dict[str, Any]] | None = None
    episodes: list[list[dict[str, Any]]] | None = None
    chat_template: str | None = None  # the run's model.chat_template
    rewards: list[float]
    beta: float
    max_tokens: int  # padded prompt + completion tokens over the whole group


class DryRunCompletion(BaseModel):
    completion: str
    reward: float
    tokens: int = Field(
        description="the completion's tokens, as the run's tokenizer splits it; an episode's "
        "assistant tokens (the ones that carry the loss)"
    )
    logprob: float = Field(description="log pi_theta(y|x), summed over the completion")
    ref_logprob: float = Field(description="log pi_ref(y|x)")
    log_ratio: float = Field(description="s_i = logprob - ref_logprob")
    weight: float = Field(
        description="w_i = (R_i - mean R) - beta * (s_i - mean s): how hard "
        "training pushes this completion up (negative: down)"
    )


class DryRunOutput(BaseModel):
    """DRY_RUN_TASK's result."""

    loss: float
    log_ratio_mean: float
    completions: list[DryRunCompletion]


class GangTask(BaseModel):
    """Join the gang of a run's attempt: start this machine's training processes, which meet
    the others at the torch.distributed rendezvous `endpoint` (torchrun's c10d backend)."""

    run_id: str
    attempt: int  # the run's attempts when its lead took it: a later attempt's gang is another
    lead: str  # the worker id that holds the run's lease (its ranks act under it)
    endpoint: str  # host:port of the rendezvous, on the lead's machine
    rendezvous_id: str


class MergeTask(BaseModel):
    """MERGE_TASK's payload: a LoRA checkpoint to merge into its base model, written to
    `target` (beside the checkpoint, in the same store) unless a merge is already there."""

    checkpoint_id: str
    checkpoint_path: str
    target: str


class GradeTask(BaseModel):
    """GRADE_TASK's payload: one sample graded (POST /v1/graders:run); the API has checked the
    grader and that the models it names are the project's."""

    project_id: str
    grader: AnyGrader
    model_sample: str
    item: dict[str, Any] = Field(default_factory=dict)


class GradeOutput(BaseModel):
    """GRADE_TASK's result: the sample's grade (workers/graders/base.py's Grade)."""

    reward: float
    error: str | None = None  # the kind (GradeError's value: OpenAI's metadata.errors name)
    detail: str | None = None
    sub_rewards: dict[str, float] = Field(default_factory=dict)
    token_usage: int = 0
    model: str | None = None
    usage: dict[str, dict[str, int]] = Field(default_factory=dict)
    execution_time: float = Field(description="seconds the grading took on the worker")
