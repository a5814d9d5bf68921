"""A worker joining another's run that spans several machines (service/contract/tasks.py
GANG_TASK; the lead's side is workers/launcher.py): start this machine's training processes at
the gang's rendezvous, and keep them while the run's attempt is the one they belong to.

The message is stale (the run ended, was paused, or went back to the queue and has another
attempt and gang now) when the run is no longer running under the lead's lease at that attempt:
then it starts nothing. While the ranks work, the worker looks again every few seconds and stops
them when that changes; the ranks also stop on their own when their gang breaks up (a collective
fails under them) or never gathers (the rendezvous times out).
"""

import logging
import subprocess

from service.config import Settings
from service.contract.events import EventType
from service.contract.spec import RunSpec
from service.contract.states import RunStatus
from service.contract.tasks import GangTask
from service.db import session_scope
from service.models import Run
from workers.launcher import start_ranks, stop
from workers.model_source import loaded_spec
from workers.records import RunRecorder

log = logging.getLogger(__name__)

LOOK_EVERY_S = 5.0


def join_gang(settings: Settings, gang: GangTask, worker_id: str) -> str:
    """Train this machine's share of the gang's run; returns how this worker's part ended."""
    if why := _stale(settings, gang):
        log.info("not joining the gang of run %s: %s", gang.run_id, why)
        return f"skipped: {why}"
    recorder = RunRecorder(settings, gang.run_id, gang.lead)
    with session_scope(settings.resolved_database_url) as session:
        stored = dict(session.get(Run, gang.run_id).spec)
    spec: RunSpec = loaded_spec(settings, gang.run_id, stored)
    proc = start_ranks(settings, spec, gang.run_id, gang.lead, gang, host=False)
    recorder.event(
        EventType.RUN_GANG_JOINED,
        f"worker {worker_id} joined the gang with {spec.resources.per_node} training processes",
        data={"worker": worker_id, "attempt": gang.attempt, "pid": proc.pid},
    )
    try:
        while True:
            try:
                proc.wait(LOOK_EVERY_S)
                break
            except subprocess.TimeoutExpired:
                if why := _stale(settings, gang):
                    log.warning("run %s: %s; stopping this machine's ranks", gang.run_id, why)
                    return f"left: {why}"
    finally:
        stop(proc)
    return f"ranks exited with code {proc.returncode}"


def _stale(settings: Settings, gang: GangTask) -> str | None:
    """Why the gang is no longer the run's (None while it is)."""
    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, gang.run_id)
        if run is None:
            return "no such run"
        if run.status != RunStatus.RUNNING:
            return f"the run is {run.status}"
        if run.lease_owner != gang.lead or run.attempts != gang.attempt:
            return f"the run's attempt {gang.attempt} is over (attempt {run.attempts} now)"
    return None
