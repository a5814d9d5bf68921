"""Thin Celery tasks: take ids (or a request's payload), hand over to the code that does the work
(which re-reads the rows). Names and payloads are the contract's (service/contract/tasks.py)."""

import os
import socket

from celery import shared_task

from service.config import get_settings
from service.contract.tasks import (
    DRY_RUN_TASK,
    MERGE_TASK,
    RESCORE_TASK,
    RUN_TASK,
    DryRunTask,
    MergeTask,
)


@shared_task(name=RUN_TASK, bind=True, acks_late=True)
def run_task(self, run_id: str) -> str:
    from workers.execute import execute_run  # torch loads in the worker child, not at import

    return execute_run(get_settings(), run_id, _worker_id(self))


@shared_task(name=RESCORE_TASK, bind=True, acks_late=True)
def rescore_task(self, rescore_id: str) -> str:
    from workers.rescore import execute_rescore

    return execute_rescore(get_settings(), rescore_id, _worker_id(self))


@shared_task(name=DRY_RUN_TASK, ignore_result=False)
def dry_run_task(payload: dict) -> dict:
    from workers.dry_run import answer_dry_run

    return answer_dry_run(get_settings(), DryRunTask.model_validate(payload)).model_dump(
        mode="json"
    )


@shared_task(name=MERGE_TASK, ignore_result=False)
def merge_task(payload: dict) -> dict:
    from workers.merge import merge_checkpoint

    return merge_checkpoint(MergeTask.model_validate(payload)).model_dump(mode="json")


def _worker_id(task) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{task.request.id}"
