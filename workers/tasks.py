"""Thin Celery tasks: take ids, hand over to the run loop (which re-reads the rows)."""

import os
import socket

from celery import shared_task

from service.config import get_settings
from workers.celery_app import RESCORE_TASK, RUN_TASK


@shared_task(name=RUN_TASK, bind=True, acks_late=True)
def run_task(self, run_id: str) -> str:
    from workers.execute import execute_run  # torch loads in the worker child, not at import

    return execute_run(get_settings(), run_id, _worker_id(self))


@shared_task(name=RESCORE_TASK, bind=True, acks_late=True)
def rescore_task(self, rescore_id: str) -> str:
    from workers.rescore import execute_rescore

    return execute_rescore(get_settings(), rescore_id, _worker_id(self))


def _worker_id(task) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{task.request.id}"
