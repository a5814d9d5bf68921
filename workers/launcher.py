"""Runs larger than one process: the Celery task that claimed the run starts its ranks with
torchrun and supervises them.

Celery's pool children are daemonic and may not start multiprocessing children, so the ranks
are a torchrun subprocess (`--standalone`: one node, a free rendezvous port per run, so several
runs share a machine). The task keeps the run's lease alive while they work; rank 0 (the lead)
also renews it, watches the step timeout, and records the run's steps and its outcome. When
the lead ends a run that did not succeed it exits non-zero, and torchrun stops the other ranks
rather than leaving them waiting in a collective.

- Each rank is `python -m workers.rank` (rank.py) under torchrun.
- A rank that fails writes why into `<run dir>/ranks/rank<N>.error`; when the ranks exit with
  the run still open, the task fails the run with the first rank's error (or the exit code).
- The lease lost to another worker: the task stops the ranks and writes nothing.
- The task's process dies (worker killed): torchrun gets SIGTERM through the parent-death
  signal and its ranks stop with it; the lease runs out and the reaper re-queues the run, which
  resumes from its latest checkpoint.
"""

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from service.config import Settings
from service.contract.spec import RunSpec
from service.contract.states import TERMINAL, RunStatus
from workers.errors import RunError
from workers.heartbeat import Heartbeat
from workers.records import RunRecorder
from workers.watchdog import Watchdog

log = logging.getLogger(__name__)

SETTINGS_ENV = "GVPO_RANK_SETTINGS"
SPEC_ENV = "GVPO_RANK_SPEC"
POLL_S = 1.0
STOP_GRACE_S = 30.0  # after SIGTERM, before the whole process group is killed
LEASE_LOST = "lease lost"  # how a run ends on a worker that lost it to another
_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int) -> None:
    """Linux: get `signum` when the process that started this one dies (kept across exec)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)


def error_file(settings: Settings, run_id: str, rank: int) -> Path:
    return settings.runs_dir / run_id / "ranks" / f"rank{rank}.error"


def launch(settings: Settings, recorder: RunRecorder, spec: RunSpec) -> str:
    """Train the claimed run on spec.resources.ranks processes; returns how it ended."""
    from workers.model_loading import pick_device  # torch: not in the torchrun stub's import

    try:
        pick_device(spec)  # more GPUs asked for than this worker has: fail before starting
    except RunError as exc:
        recorder.fail(str(exc))
        return RunStatus.FAILED
    ranks, run_id = spec.resources.ranks, recorder.run_id
    for rank in range(ranks):
        error_file(settings, run_id, rank).unlink(missing_ok=True)  # from an earlier attempt
    env = {
        **os.environ,
        SETTINGS_ENV: settings.model_dump_json(),
        SPEC_ENV: json.dumps(spec.model_dump(mode="json")),
    }
    command = [
        sys.executable,
        "-m",
        "workers.launcher",
        "torchrun",
        "--standalone",
        f"--nproc-per-node={ranks}",
        "--max-restarts=0",
        "-m",
        "workers.rank",
        run_id,
        recorder.worker_id,
    ]
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    recorder.event(
        "run.launched",
        f"started {ranks} training processes with torchrun",
        data={"ranks": ranks, "pid": proc.pid},
    )
    heartbeat = Heartbeat(recorder, settings.heartbeat_seconds, Watchdog(None))
    heartbeat.start()
    try:
        while proc.poll() is None:
            if not heartbeat.lost.wait(POLL_S):
                continue
            if recorder.status()[1] is not None:
                log.warning("run %s: lease lost to another worker; stopping its ranks", run_id)
                return LEASE_LOST
            try:  # the lead ended the run and gave the lease up: its ranks are exiting
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                break
    finally:
        heartbeat.stopped.set()
        _stop(proc)
    return _outcome(settings, recorder, ranks, proc.returncode)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()  # torchrun passes it on to the ranks
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _outcome(settings: Settings, recorder: RunRecorder, ranks: int, code: int) -> str:
    """How the run ended once its ranks exited: what the lead recorded, else a failure."""
    status, owner = recorder.status()
    if owner not in (None, recorder.worker_id):
        return LEASE_LOST
    if status in TERMINAL or status == RunStatus.PAUSED:
        return status
    errors = [
        (rank, path.read_text())
        for rank in range(ranks)
        if (path := error_file(settings, recorder.run_id, rank)).exists()
    ]
    if errors:
        rank, error = errors[0]
        message = f"training process {rank} of {ranks} failed: {error}"
    else:
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        message = f"the training processes ended with {how} before the run finished"
    recorder.fail(
        message,
        {"exit_code": code, "ranks": ranks, "errors": {str(rank): error for rank, error in errors}},
    )
    return RunStatus.FAILED


def main(argv: list[str]) -> int:
    """The torchrun agent: ends with the task that started it."""
    if argv[:1] != ["torchrun"]:
        raise SystemExit("usage: python -m workers.launcher torchrun ARGS")
    die_with_parent(signal.SIGTERM)
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", *argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
