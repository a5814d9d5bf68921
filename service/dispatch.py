"""Hands work to the workers through the broker, by task name (service/contract/tasks.py).

Rows are published only after they are committed: a run or rescore stays queued when the broker
is down, and the reaper publishes it later. A request that needs a model (the loss dry-run, a
merged checkpoint) is asked of a worker, and the API waits for the answer with a deadline.
"""

import logging
from typing import Any

from celery.exceptions import TimeoutError as ResultTimeout
from pydantic import BaseModel

from service.config import Settings
from service.contract.tasks import TaskAnswer, publisher, result_backend_url
from service.errors import Conflict, GatewayTimeout, InvalidSpec, ServiceUnavailable, WorkerFailed

log = logging.getLogger(__name__)

RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5}


def prepare(settings: Settings) -> None:
    """Build this process's publisher now, with what Celery and kombu otherwise make or import
    only on first use (the AMQP helpers and router, the producer pool, the transport's and the
    result backend's modules: some 170 modules with Redis). The API calls it at start-up, so
    that a fresh API's first requests, each in its own thread, do not all do it at once.
    Connects to nothing: a broker that is down is found when a task is published."""
    app = publisher(settings)
    _ = app.amqp.router, app.producer_pool  # lazy properties: reading one builds it
    with app.connection_for_write() as connection:
        _ = connection.transport
    if result_backend_url(settings) is not None:
        _ = app.backend


def enqueue(
    settings: Settings, task: str, row_id: str, queue: str, task_id: str | None = None
) -> bool:
    """Publish `task` for the row `row_id` (as `task_id` when given); False if the broker is
    unreachable (the row stays queued for the reaper to publish)."""
    try:
        publisher(settings).send_task(
            task,
            args=[row_id],
            task_id=task_id,
            queue=queue,
            ignore_result=True,
            retry=True,
            retry_policy=RETRY_POLICY,
        )
    except Exception:  # broker down: the row is already durable and stays queued
        log.exception("could not enqueue %s %s on queue %s", task, row_id, queue)
        return False
    return True


def ask_worker(
    settings: Settings,
    task: str,
    payload: BaseModel,
    queue: str,
    what: str,
    extra_s: float = 0.0,
) -> dict[str, Any]:
    """Have a worker on `queue` run `task` on `payload` and return its result, waiting at most
    settings.worker_answer_timeout_s, plus `extra_s` for a task that may wait for a model to
    load (settings.serve_load_timeout_s: a grader's judge). `what` names the request in errors ("the
    dry run").

    503 when the broker or result backend cannot be reached, 504 when no worker answered in
    time (the task expires then, so a worker that frees up later does not run it for nobody),
    the task's own problem as 409/422, and 502 when the worker broke on it."""
    timeout = settings.worker_answer_timeout_s + extra_s
    if result_backend_url(settings) is None:
        raise ServiceUnavailable(
            f"{what} needs a worker's answer, and no result backend is "
            "configured for this broker: set GVPO_RESULT_BACKEND"
        )
    try:
        pending = publisher(settings).send_task(
            task,
            args=[payload.model_dump(mode="json")],
            queue=queue,
            expires=timeout,
            retry=True,
            retry_policy=RETRY_POLICY,
        )
    except Exception as exc:
        log.exception("could not publish %s on queue %s", task, queue)
        raise ServiceUnavailable(
            f"{what} needs a worker, and the broker cannot be reached "
            f"({type(exc).__name__}); try again shortly"
        ) from None
    try:
        raw = pending.get(timeout=timeout, interval=0.2, propagate=False)
    except ResultTimeout:
        allowed = "GVPO_WORKER_ANSWER_TIMEOUT_S" + (
            " + GVPO_SERVE_LOAD_TIMEOUT_S" if extra_s else ""
        )
        raise GatewayTimeout(
            f"no worker on queue {queue!r} answered {what} within {timeout:g} s ({allowed}): "
            "each worker takes one task at a time, so one that is training a run answers when "
            "the run has ended; start a worker on that queue, or try again later",
            {"queue": queue},
        ) from None
    except Exception as exc:  # the result backend went away while we waited
        raise ServiceUnavailable(
            f"{what}: the worker's answer could not be read ({type(exc).__name__}: {exc})"
        ) from None
    pending.forget()  # read once: no need to keep it until it expires
    if isinstance(raw, BaseException):
        raise WorkerFailed(f"the worker failed on {what}: {type(raw).__name__}: {raw}")
    answer = TaskAnswer.model_validate(raw)
    if answer.problem is None:
        return answer.result or {}
    if answer.problem.kind == "invalid":
        raise InvalidSpec(
            answer.problem.fields or [{"field": "body", "message": answer.problem.message}]
        )
    raise Conflict(answer.problem.message)


def broker_reachable(settings: Settings) -> bool:
    try:
        with publisher(settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
    except Exception:
        return False
    return True
