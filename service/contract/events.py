"""The types of a run's events (GET /v1/runs/{id}/events), written by the API and the workers.

A run event is `{type, level, message, data}`: `type` says what happened (one of these), `level`
how much it matters, `message` says it for a person and `data` for a program.
"""

from enum import StrEnum

from service.contract.states import RunStatus


class EventLevel(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class EventType(StrEnum):
    # the run's life (the API: queued, requests; the worker: the rest)
    RUN_QUEUED = "run.queued"
    # a queued run the project's quota holds back (data: reason, and the quota and use that
    # say so), and the moment it is let through to the workers
    RUN_WAITING = "run.waiting"
    RUN_ADMITTED = "run.admitted"
    RUN_STARTED = "run.started"
    RUN_LAUNCHED = "run.launched"
    RUN_GANG_JOINED = "run.gang_joined"  # another machine's worker joined a multi-machine run
    RUN_MODEL_LOADED = "run.model_loaded"
    RUN_RESUMED = "run.resumed"
    RUN_WAITING_FOR_GROUPS = "run.waiting_for_groups"  # training.wait_for_groups: once a step
    RUN_REQUEUED = "run.requeued"
    RUN_PAUSE_REQUESTED = "run.pause_requested"
    RUN_PAUSED = "run.paused"
    RUN_RESUME_REQUESTED = "run.resume_requested"
    RUN_CANCEL_REQUESTED = "run.cancel_requested"
    RUN_SUCCEEDED = "run.succeeded"
    RUN_FAILED = "run.failed"
    RUN_CANCELLED = "run.cancelled"
    # what happens inside a run
    ROLLOUT_FALLBACK = "rollout.fallback"
    ROLLOUT_LOGPROB_MISMATCH = "rollout.logprob_mismatch"
    REWARD_RETRY = "reward.retry"
    # a step's samples that a grader could not grade (reward 0): how many, and one's error
    REWARD_GRADER_ERRORS = "reward.grader_errors"
    ENVIRONMENT_RETRY = "environment.retry"
    EVAL_FINAL = "eval.final"
    CHECKPOINT_SAVED = "checkpoint.saved"
    CHECKPOINT_UPLOAD_RETRY = "checkpoint.upload_retry"
    GROUPS_POSTED = "groups.posted"
    # spec.tracking: which tracker run the run logs to (data: tracker, and its run's id/url);
    # a tracker that failed and was dropped for the rest of the attempt (a warning)
    TRACKING_STARTED = "tracking.started"
    TRACKING_FAILED = "tracking.failed"
    WEBHOOK_SECRET_ROTATED = "webhook.secret_rotated"
    # re-scoring an ended run
    RESCORE_QUEUED = "rescore.queued"
    RESCORE_SUCCEEDED = "rescore.succeeded"
    RESCORE_FAILED = "rescore.failed"
    # the run's notify_url
    NOTIFY_DELIVERED = "notify.delivered"
    NOTIFY_FAILED = "notify.failed"


# How a run ended -> the event that says so (also the type of its notify_url notification).
ENDED: dict[RunStatus, EventType] = {
    RunStatus.SUCCEEDED: EventType.RUN_SUCCEEDED,
    RunStatus.FAILED: EventType.RUN_FAILED,
    RunStatus.CANCELLED: EventType.RUN_CANCELLED,
}
