"""Run states and their legal moves: the one place where they are spelled out.

    queued -> running <-> paused -> succeeded | failed | cancelled

A run waits `queued` until a worker claims it (`running`). A running run goes back to `queued`
when the reaper finds its worker's lease expired (the next worker resumes it), to `paused` when
its worker honours a pause, and ends `succeeded`, `failed` or `cancelled`. A queued run can be
paused or cancelled at once; a paused one is resumed (queued again) or cancelled. An ended run
never moves again.

The API, the workers, the gRPC mapping and the dashboard (through GET /v1/run-states) all read
this table; nothing else names a state.
"""

from enum import StrEnum


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


STATES = tuple(RunStatus)  # for membership tests of plain strings (Python 3.11 enums refuse them)

# status -> the statuses it may move to. RUNNING -> RUNNING is a worker taking over the lease of
# a run whose worker died before the reaper requeued it.
TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.QUEUED: frozenset({RunStatus.RUNNING, RunStatus.PAUSED, RunStatus.CANCELLED}),
    RunStatus.RUNNING: frozenset(
        {
            RunStatus.QUEUED,
            RunStatus.RUNNING,
            RunStatus.PAUSED,
            RunStatus.SUCCEEDED,
            RunStatus.FAILED,
            RunStatus.CANCELLED,
        }
    ),
    RunStatus.PAUSED: frozenset({RunStatus.QUEUED, RunStatus.CANCELLED}),
    RunStatus.SUCCEEDED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.CANCELLED: frozenset(),
}

TERMINAL = frozenset(status for status, targets in TRANSITIONS.items() if not targets)
ENDINGS = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)  # in the order shown
# Waiting for, or held by, a worker: what the dashboard polls.
LIVE = frozenset({RunStatus.QUEUED, RunStatus.RUNNING})

# What a user may ask for, and in which states (else 409). Pausing or cancelling a running run
# is a request its worker honours between steps; in the other states it takes effect at once.
ACTIONS: dict[str, frozenset[RunStatus]] = {
    "cancel": frozenset(TRANSITIONS) - TERMINAL,
    "pause": frozenset({RunStatus.QUEUED, RunStatus.RUNNING}),
    "resume": frozenset({RunStatus.PAUSED}),
}


def sources(target: RunStatus) -> frozenset[RunStatus]:
    """The statuses from which a run may move to `target`."""
    return frozenset(status for status, targets in TRANSITIONS.items() if target in targets)


class RescoreStatus(StrEnum):
    """A rescore (service/rescores): queued until a worker claims it, then running (back to
    queued when its lease expires), and it ends succeeded or failed."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


RESCORE_ACTIVE = frozenset({RescoreStatus.QUEUED, RescoreStatus.RUNNING})


class NotifyState(StrEnum):
    """A run's notify_url outbox (service/runs/notify.py): pending until the run has ended and
    the notification went out, then delivered or failed."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
