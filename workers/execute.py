"""Executing a run: claim it, train it (in this process, or on several through the launcher),
and record how it ended, whatever happened.

Any failure ends the run as `failed` with an event saying why; checkpoints already written stay
listed. A cancel, a pause or a lost lease ends it the way the user or the lease says.
"""

import logging

from pydantic import ValidationError

from service.config import Settings
from service.contract.events import ENDED, EventLevel
from service.contract.spec import RunSpec
from service.contract.states import RunStatus
from service.models.base import new_id
from workers.errors import RunError
from workers.heartbeat import Heartbeat, record_timeout
from workers.launcher import LEASE_LOST, launch
from workers.model_source import loaded_spec
from workers.ranks import Ranks, gang_broke
from workers.records import RunRecorder
from workers.run_loop import Cancelled, LeaseLost, Paused, RunLoop
from workers.tracking import start_tracking
from workers.watchdog import StepTimeout, Watchdog

log = logging.getLogger(__name__)

STOPS = {Cancelled: RunStatus.CANCELLED, Paused: RunStatus.PAUSED, LeaseLost: LEASE_LOST}


def execute_run(settings: Settings, run_id: str, worker_id: str, task_id: str | None = None) -> str:
    """Run `run_id` if this worker can claim it (with the message `task_id`, when one was
    delivered); returns the final status or why it skipped."""
    recorder = RunRecorder(settings, run_id, worker_id)
    spec, why = recorder.claim(task_id)
    if spec is None:
        return f"skipped: {why}"
    try:
        run_spec = loaded_spec(settings, run_id, spec)
    except ValidationError as exc:  # stored under an older, looser version of the rules
        recorder.finish(
            RunStatus.FAILED,
            f"run failed: its stored spec is no longer valid: {exc}",
            EventLevel.ERROR,
            error=f"invalid spec: {exc}",
        )
        return RunStatus.FAILED
    except RunError as exc:  # a model folder the run may not load
        recorder.finish(RunStatus.FAILED, str(exc), EventLevel.ERROR, error=str(exc))
        return RunStatus.FAILED
    if run_spec.resources.ranks > 1:
        return launch(settings, recorder, run_spec)
    return drive(settings, recorder, run_spec, Ranks())


def drive(settings: Settings, recorder: RunRecorder, spec: RunSpec, ranks: Ranks) -> str:
    """Train the claimed run in this process (one rank of it, if it has several) and return
    how it ended. The lead records every outcome; the other ranks follow its decisions and
    leave failures to the launcher."""
    if not ranks.lead:
        try:
            RunLoop(settings, recorder, spec, None, ranks).run()
            return RunStatus.SUCCEEDED
        except (Cancelled, Paused, LeaseLost) as stop:
            return STOPS[type(stop)]
    recorder.tracking = start_tracking(settings, recorder, spec)
    outcome = RunStatus.FAILED
    try:
        outcome = _lead(settings, recorder, spec, ranks)
        return outcome
    finally:
        if recorder.tracking is not None:  # the trackers' runs end as the run did
            recorder.tracking.close(RunStatus(outcome) if outcome in ENDED else None)


def _lead(settings: Settings, recorder: RunRecorder, spec: RunSpec, ranks: Ranks) -> str:
    """The lead's side of drive: the lease's heartbeat and the step watchdog around the loop,
    and the outcome recorded."""
    watchdog = Watchdog(spec.resources.step_timeout_s)
    watchdog.arm()
    heartbeat = Heartbeat(recorder, settings.heartbeat_seconds, watchdog)
    heartbeat.start()
    try:
        RunLoop(settings, recorder, spec, heartbeat, ranks).run()
        return RunStatus.SUCCEEDED
    except StepTimeout as timeout:
        log.error("run %s: %s", recorder.run_id, timeout)
        record_timeout(recorder, timeout)
        return RunStatus.FAILED
    except Cancelled:
        recorder.finish(RunStatus.CANCELLED, "run cancelled on request")
        return RunStatus.CANCELLED
    except Paused as paused:
        recorder.pause(paused.step)
        return RunStatus.PAUSED
    except LeaseLost:
        log.warning(
            "run %s: lease lost to another worker; stopping without writing", recorder.run_id
        )
        return LEASE_LOST
    except Exception as exc:
        if ranks.nodes > 1 and gang_broke(exc):  # the launcher puts the run back in the queue
            raise
        message = str(exc) if isinstance(exc, RunError) else f"{type(exc).__name__}: {exc}"
        if ranks.world > 1 and not isinstance(exc, RunError):  # e.g. another rank died
            message = f"training process 0 of {ranks.world}: {message}"
        # The traceback (server paths, code) stays in the worker's log, found by the error id
        # that the run's failure event carries.
        error_id = new_id("err")
        log.exception("run %s failed (error %s)", recorder.run_id, error_id)
        recorder.fail(message, {"exception": type(exc).__name__, "error_id": error_id})
        return RunStatus.FAILED
    finally:
        heartbeat.stopped.set()
        watchdog.disarm()
