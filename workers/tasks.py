"""Thin Celery tasks: take ids, hand over to the run loop (which re-reads the rows)."""

import os
import socket

from celery import shared_task

from service.config import get_settings
from workers.celery_app import RUN_TASK


@shared_task(name=RUN_TASK, bind=True, acks_late=True)
def run_task(self, run_id: str) -> str:
    from workers.execute import execute_run  # torch loads in the worker child, not at import

    worker_id = f"{socket.gethostname()}:{os.getpid()}:{self.request.id}"
    return execute_run(get_settings(), run_id, worker_id)
