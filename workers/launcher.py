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

A run spanning several machines (resources.nodes = N, each with resources.per_node ranks): the
worker that took it (the gang's lead) starts its torchrun hosting a c10d rendezvous on its
machine (settings.node_address, a free port) and publishes N - 1 GANG_TASKs on the run's queue;
each worker that takes one starts its own torchrun at that rendezvous (workers/gang.py). Ranks
are numbered by the rendezvous, so rank 0 may run on any of the machines: every rank acts under
the lead's lease (the lead's worker id), and rank 0 records as in one machine. The data folder
(or the checkpoint store) is shared by the gang's machines: rank 0 writes the checkpoints that
every rank resumes from. When the ranks exit with the run still open and no rank failed on its
own (a rank whose collective or rendezvous failed under it writes `rank<N>.lost`, not
`.error`), the gang broke up (a machine lost) or never gathered (not enough free workers within
settings.gang_join_timeout_s): the run goes back to the queue and resumes from its latest
checkpoint on a fresh gang, up to settings.gang_retries times in a row without a new checkpoint.
"""

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from service.config import Settings
from service.contract.events import EventType
from service.contract.spec import RunSpec
from service.contract.states import TERMINAL, RunStatus
from service.contract.tasks import GANG_TASK, GangTask, publisher
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


def rank_files(settings: Settings, run_id: str, rank: int) -> tuple[Path, Path]:
    """Where rank `rank` writes why it stopped: (its own failure, its gang's breaking up: a
    collective or the rendezvous failed under it)."""
    folder = settings.runs_dir / run_id / "ranks"
    return folder / f"rank{rank}.error", folder / f"rank{rank}.lost"


def launch(settings: Settings, recorder: RunRecorder, spec: RunSpec) -> str:
    """Train the claimed run on spec.resources.ranks processes (on this machine, and with a
    gang of other workers when it spans several); returns how it ended."""
    from workers.model_loading import pick_device  # torch: not in the torchrun stub's import
    from workers.serving.vllm_server import free_port

    try:
        pick_device(spec)  # more GPUs asked for than this worker has: fail before starting
    except RunError as exc:
        recorder.fail(str(exc))
        return RunStatus.FAILED
    ranks, nodes, run_id = spec.resources.ranks, spec.resources.nodes, recorder.run_id
    for rank in range(ranks):  # from an earlier attempt
        for path in rank_files(settings, run_id, rank):
            path.unlink(missing_ok=True)
    gang = None
    if nodes > 1:
        address = node_address(settings)
        gang = GangTask(
            run_id=run_id,
            attempt=recorder.attempt,
            lead=recorder.worker_id,
            endpoint=f"{address}:{free_port(address)}",
            rendezvous_id=f"{run_id}-{recorder.attempt}",
        )
    proc = start_ranks(settings, spec, run_id, recorder.worker_id, gang)
    said = f"started {spec.resources.per_node} training processes with torchrun"
    if gang is not None:
        said += "; " + _ask_to_join(settings, spec, gang)
    recorder.event(
        EventType.RUN_LAUNCHED,
        said,
        data={"ranks": ranks, "nodes": nodes, "pid": proc.pid},
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
        stop(proc)
    return _outcome(settings, recorder, spec, proc.returncode)


def _ask_to_join(settings: Settings, spec: RunSpec, gang: GangTask) -> str:
    """Publish the gang's join tasks; what was done, for the run's event. A broker that cannot
    be reached leaves the gang short: it does not gather, and the run goes back to the queue."""
    others, queue = spec.resources.nodes - 1, spec.resources.queue
    try:
        for _ in range(others):
            publisher(settings).send_task(
                GANG_TASK, args=[gang.model_dump()], queue=queue, retry=True
            )
    except Exception as exc:
        log.exception("run %s: could not ask for the gang's workers", gang.run_id)
        return f"could not ask {others} more workers to join ({type(exc).__name__}: {exc})"
    return f"asked {others} more workers of queue {queue!r} to join"


def node_address(settings: Settings) -> str:
    """Where the gang's other machines reach this one: settings.node_address, else the address
    this machine's name resolves to (a container's or a pod's own IP)."""
    return settings.node_address or socket.gethostbyname(socket.gethostname())


def start_ranks(
    settings: Settings,
    spec: RunSpec,
    run_id: str,
    lead: str,
    gang: GangTask | None = None,
    host: bool = True,
) -> subprocess.Popen:
    """This machine's training processes of the run under torchrun, acting under the lease of
    the worker `lead`. Without a gang, a standalone rendezvous on this machine; with one, the
    gang's c10d rendezvous, which the lead's machine hosts (`host`)."""
    if gang is None:
        where = ["--standalone"]
    else:
        where = [
            f"--nnodes={spec.resources.nodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={gang.endpoint}",
            f"--rdzv-id={gang.rendezvous_id}",
            f"--rdzv-conf=is_host={int(host)},join_timeout={settings.gang_join_timeout_s:g}",
            f"--local-addr={node_address(settings)}",
        ]
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
        *where,
        f"--nproc-per-node={spec.resources.per_node}",
        "--max-restarts=0",
        "-m",
        "workers.rank",
        run_id,
        lead,
    ]
    return subprocess.Popen(command, env=env, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()  # torchrun passes it on to the ranks
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _outcome(settings: Settings, recorder: RunRecorder, spec: RunSpec, code: int) -> str:
    """How the run ended once its ranks exited: what the lead recorded; else back in the queue
    when a gang broke up or never gathered (a machine lost: no rank failed on its own); else a
    failure, with the first failed rank's error."""
    status, owner = recorder.status()
    if owner not in (None, recorder.worker_id):
        return LEASE_LOST
    if status in TERMINAL or status == RunStatus.PAUSED:
        return status
    ranks = spec.resources.ranks
    errors = [
        (rank, path.read_text())
        for rank in range(ranks)
        if (path := rank_files(settings, recorder.run_id, rank)[0]).exists()
    ]
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    if not errors and spec.resources.nodes > 1:
        return _gang_broke(settings, recorder, spec, how)
    if errors:
        rank, error = errors[0]
        message = f"training process {rank} of {ranks} failed: {error}"
    else:
        message = f"the training processes ended with {how} before the run finished"
    recorder.fail(
        message,
        {"exit_code": code, "ranks": ranks, "errors": {str(rank): error for rank, error in errors}},
    )
    return RunStatus.FAILED


def _gang_broke(settings: Settings, recorder: RunRecorder, spec: RunSpec, how: str) -> str:
    """Back in the queue, to resume from the latest checkpoint on a fresh gang; failed when
    the gang broke settings.gang_retries times in a row without a new checkpoint."""
    nodes = spec.resources.nodes
    checkpoint = recorder.latest_checkpoint()
    at = checkpoint[0] if checkpoint else 0
    breaks = recorder.gang_breaks(at) + 1
    if breaks > settings.gang_retries:
        recorder.fail(
            f"the gang of {nodes} workers broke up or could not gather {breaks} times in a row "
            f"without a new checkpoint (last: the training processes ended with {how}); "
            f"check that the queue {spec.resources.queue!r} has {nodes} workers that reach "
            "each other (GVPO_NODE_ADDRESS)",
            {"nodes": nodes, "breaks": breaks},
        )
        return RunStatus.FAILED
    recorder.requeue(
        f"the gang of {nodes} workers broke up or could not gather within "
        f"{settings.gang_join_timeout_s:g} s (this machine's training processes ended with "
        f"{how}); queued again to resume from the latest checkpoint on a fresh gang",
        {"gang": True, "nodes": nodes, "checkpoint_step": at, "breaks": breaks},
    )
    return RunStatus.QUEUED


def main(argv: list[str]) -> int:
    """The torchrun agent: ends with the task that started it."""
    if argv[:1] != ["torchrun"]:
        raise SystemExit("usage: python -m workers.launcher torchrun ARGS")
    die_with_parent(signal.SIGTERM)
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", *argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
