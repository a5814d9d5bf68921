"""Hands runs to the workers through the broker. Called only after the run's row is committed."""

import logging

from service.config import Settings

log = logging.getLogger(__name__)


def enqueue_run(settings: Settings, run_id: str, queue: str) -> bool:
    """Publish the run's task; False if the broker is unreachable (the run stays queued)."""
    from workers.celery_app import RUN_TASK

    return enqueue(settings, RUN_TASK, run_id, queue)


def enqueue(settings: Settings, task: str, row_id: str, queue: str) -> bool:
    """Publish `task` for the row `row_id`; False if the broker is unreachable (the row stays
    queued for the reaper to publish)."""
    from workers.celery_app import get_celery_app

    try:
        get_celery_app(settings).send_task(
            task, args=[row_id], queue=queue, retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
    except Exception:  # broker down: the row is already durable and stays queued
        log.exception("could not enqueue %s %s on queue %s", task, row_id, queue)
        return False
    return True


def broker_reachable(settings: Settings) -> bool:
    from workers.celery_app import get_celery_app

    try:
        with get_celery_app(settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
    except Exception:
        return False
    return True
