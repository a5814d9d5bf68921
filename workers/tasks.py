"""Thin Celery tasks: take ids (or a request's payload), hand over to the code that does the work
(which re-reads the rows). Names and payloads are the contract's (service/contract/tasks.py)."""

import os
import socket

from celery import shared_task

from service.config import get_settings
from service.contract.tasks import (
    DRY_RUN_TASK,
    GANG_TASK,
    GRADE_TASK,
    MERGE_TASK,
    RESCORE_TASK,
    RUN_TASK,
    DryRunTask,
    GangTask,
    GradeTask,
    MergeTask,
)
from workers.records import RunRecorder


@shared_task(name=RUN_TASK, bind=True, acks_late=True)
def run_task(self, run_id: str) -> str:
    settings, worker_id = get_settings(), _worker_id(self)
    # Asked before any model library loads (and before the lease, which the heartbeat keeps
    # only once training starts): a message that cannot start the run, superseded by a newer
    # one or finding the run paused, ended or taken, is done with in milliseconds.
    if why := RunRecorder(settings, run_id, worker_id).unstartable(self.request.id):
        return f"skipped: {why}"
    from workers.execute import execute_run  # torch loads here, in the worker's child

    return execute_run(settings, run_id, worker_id, self.request.id)


@shared_task(name=GANG_TASK, bind=True, acks_late=True)
def gang_task(self, payload: dict) -> str:
    from workers.gang import join_gang

    return join_gang(get_settings(), GangTask.model_validate(payload), _worker_id(self))


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


@shared_task(name=GRADE_TASK, ignore_result=False)
def grade_task(payload: dict) -> dict:
    from workers.graders.single import answer_grade

    return answer_grade(get_settings(), GradeTask.model_validate(payload)).model_dump(mode="json")


def _worker_id(task) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{task.request.id}"
