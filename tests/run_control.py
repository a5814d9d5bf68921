"""Driving a run the way workers and the API do, for the tests of pause, resume and faults:
execute it in a thread, act on it as the API does, kill a worker mid-run and wait out its
lease, and read back its events and final weights."""

import os
import signal
import subprocess
import sys
import threading

from sqlalchemy import func, select

from service.db import session_scope
from service.models import Checkpoint, Metric, Project, Run, RunEvent
from service.models.base import utcnow
from service.runs import control
from workers.environments.builtin import secret_code_rows
from workers.execute import execute_run

from factories import WORKER_S, submit, wait_until

RESUMABLE_STEPS = 6


def act(settings, action: str, run_id: str) -> Run:
    """pause_run / resume_run / cancel_run as the API calls them, committed."""
    with session_scope(settings.resolved_database_url) as session:
        project = session.get(Project, session.get(Run, run_id).project_id)
        fn = getattr(control, f"{action}_run")
        args = (
            (session, settings, project, run_id)
            if action == "resume"
            else (session, project, run_id)
        )
        run = fn(*args)
        session.flush()
        session.expunge(run)
        return run


def event_types(settings, run_id: str) -> list[str]:
    with session_scope(settings.resolved_database_url) as session:
        return list(
            session.scalars(
                select(RunEvent.type).where(RunEvent.run_id == run_id).order_by(RunEvent.id)
            )
        )


def run_row(settings, run_id: str) -> Run:
    with session_scope(settings.resolved_database_url) as session:
        return session.get(Run, run_id)


def execute_in_thread(settings, run_id: str, worker_id: str) -> tuple[threading.Thread, dict]:
    """execute_run in a thread, as a worker runs it; its outcome lands in the dict's "status"."""
    result: dict[str, str] = {}
    thread = threading.Thread(
        target=lambda: result.update(status=execute_run(settings, run_id, worker_id))
    )
    thread.start()
    return thread, result


def series(settings, run_id: str, name: str) -> dict[int, float]:
    """The run's metric `name`: {step: value}."""
    with session_scope(settings.resolved_database_url) as session:
        rows = session.execute(
            select(Metric.step, Metric.value).where(Metric.run_id == run_id, Metric.name == name)
        ).all()
    return dict(rows)


def wait_for_step(settings, run_id: str, step: int, timeout: float = WORKER_S) -> None:
    wait_until(
        lambda: run_row(settings, run_id).step >= step,
        timeout,
        f"run {run_id} to reach step {step}",
        every=0.01,
    )


def resumable(
    settings,
    tiny_model_dir,
    reference: str,
    lora: dict | None,
    episodes: bool = False,
    max_lag: int = 0,
    engine: str = "hf",
    **more: dict,
) -> str:
    """A queued run of RESUMABLE_STEPS steps with a checkpoint at step 3, whose steps are slow
    enough (~0.1-0.2 s) for a test to kill its worker between checkpoints; `episodes`: of the
    built-in secret_code environment, on its chat rows; `max_lag`: async; `more`: other
    sections of the spec."""
    sections = dict(more)
    if episodes:
        sections |= {
            "environment": {"type": "builtin", "name": "secret_code", "max_turns": 2},
            "train_rows": secret_code_rows(32),
        }
    return submit(
        settings,
        tiny_model_dir,
        **sections,
        model={"lora": lora},
        optimizer={"lr": 1e-2},
        reward={"type": "builtin", "name": "regex", "params": {"pattern": "[a-z]"}},
        algorithm={"group_size": 8, "beta": 0.05, "reference": reference},
        sampling={"max_new_tokens": 12},
        training={
            "steps": RESUMABLE_STEPS,
            "prompts_per_step": 8,
            "mini_batches": 2,
            "max_lag": max_lag,
        },
        rollout={"engine": engine},
        checkpoint={"every_steps": 3, "keep_last": None},
    )


def wait_for_lease_to_lapse(settings, run_id: str) -> None:
    """Until the run's lease has expired (by this machine's clock, which the next worker's
    claim compares it with), so that another worker may take the run."""

    def lapsed() -> bool:
        expires = run_row(settings, run_id).lease_expires_at
        return expires is None or expires < utcnow()

    wait_until(lapsed, 30, f"the lease of run {run_id} to run out")


def kill_after_first_checkpoint(settings, run_id: str) -> None:
    """Execute the run in a child process with a 1 s lease, SIGKILL it once the run's first
    checkpoint is recorded, and wait until its lease has run out."""
    code = (
        "import sys; from service.config import Settings; "
        "from workers.execute import execute_run; "
        "execute_run(Settings.model_validate_json(sys.argv[1]), sys.argv[2], 'doomed-worker')"
    )
    doomed = settings.model_copy(update={"lease_seconds": 1.0, "heartbeat_seconds": 0.3})
    child = subprocess.Popen(
        [sys.executable, "-c", code, doomed.model_dump_json(), run_id],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )

    def checkpointed() -> int:
        assert child.poll() is None, f"the worker exited ({child.returncode}) before a checkpoint"
        with session_scope(settings.resolved_database_url) as session:
            return session.scalar(
                select(func.count()).select_from(Checkpoint).where(Checkpoint.run_id == run_id)
            )

    try:
        wait_until(checkpointed, WORKER_S, f"a checkpoint of run {run_id}", every=0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    wait_for_lease_to_lapse(settings, run_id)


def final_weights(settings, run_id: str, step: int = RESUMABLE_STEPS) -> dict:
    """The weights (or the LoRA adapter's) of the run's checkpoint at `step`."""
    from safetensors.torch import load_file

    with session_scope(settings.resolved_database_url) as session:
        path = session.scalar(
            select(Checkpoint.path).where(Checkpoint.run_id == run_id, Checkpoint.step == step)
        )
    name = "adapter_model" if os.path.exists(f"{path}/adapter_model.safetensors") else "model"
    return load_file(f"{path}/{name}.safetensors")
