"""Pause, resume and cancel: cooperative between steps, reflected in state and events; a paused
run's checkpoint loads and resume continues from it. (The HTTP side is in test_api.)"""

import threading
import time

import pytest
from factories import submit
from sqlalchemy import func, select

from service.db import session_scope
from service.errors import Conflict
from service.models import Checkpoint, Metric, Project, Run, RunEvent
from service.runs import service
from workers.execute import execute_run

pytestmark = pytest.mark.both_backends

STEPS = 8


def call(settings, action: str, run_id: str) -> Run:
    """pause_run / resume_run / cancel_run as the API calls them, committed."""
    with session_scope(settings.resolved_database_url) as session:
        project = session.get(Project, session.get(Run, run_id).project_id)
        fn = getattr(service, f"{action}_run")
        args = (session, settings, project, run_id) if action == "resume" else (session, project,
                                                                                  run_id)
        run = fn(*args)
        session.flush()
        session.expunge(run)
        return run


def events(settings, run_id) -> list[str]:
    with session_scope(settings.resolved_database_url) as session:
        return list(session.scalars(select(RunEvent.type).where(RunEvent.run_id == run_id)
                                    .order_by(RunEvent.id)))


def test_pause_resume_cancel(settings, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    run_id = submit(settings, tiny_model_dir, training={"steps": STEPS},
                    checkpoint={"every_steps": 100, "keep_last": None})
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        status=execute_run(settings, run_id, "worker-a")))
    worker.start()
    deadline = time.monotonic() + 60
    while True:  # pause once the run is under way
        with session_scope(settings.resolved_database_url) as session:
            if session.get(Run, run_id).step >= 2:
                break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert call(settings, "pause", run_id).pause_requested
    worker.join(timeout=60)
    assert result["status"] == "paused"

    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
        assert (run.status, run.lease_owner, run.pause_requested) == ("paused", None, False)
        paused_at = run.step
        ckpt = session.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id)).one()
    assert 2 <= paused_at < STEPS and ckpt.step == paused_at
    AutoModelForCausalLM.from_pretrained(ckpt.path)  # the paused run's checkpoint loads
    assert events(settings, run_id)[-3:] == ["run.pause_requested", "checkpoint.saved",
                                             "run.paused"]
    # A stale delivery of the task does not wake a paused run.
    assert execute_run(settings, run_id, "worker-x") == "skipped: run is paused"
    with pytest.raises(Conflict):
        call(settings, "pause", run_id)

    assert call(settings, "resume", run_id).status == "queued"
    with pytest.raises(Conflict):
        call(settings, "resume", run_id)
    assert execute_run(settings, run_id, "worker-b") == "succeeded"
    types = events(settings, run_id)
    assert types[types.index("run.paused") + 1:][:4] == [
        "run.resume_requested", "run.started", "run.resumed", "run.model_loaded"]
    with session_scope(settings.resolved_database_url) as session:
        resumed = session.scalars(select(RunEvent).where(
            RunEvent.run_id == run_id, RunEvent.type == "run.resumed")).one()
        assert resumed.data["step"] == paused_at
        per_step = session.execute(select(Metric.step, func.count()).where(
            Metric.run_id == run_id, Metric.name == "loss").group_by(Metric.step)).all()
    assert sorted(per_step) == [(s, 1) for s in range(1, STEPS + 1)]
    with pytest.raises(Conflict):
        call(settings, "cancel", run_id)  # succeeded is final


def test_queued_run_pauses_at_once_and_cancels_from_paused(settings, tiny_model_dir):
    run_id = submit(settings, tiny_model_dir)
    assert call(settings, "pause", run_id).status == "paused"
    assert execute_run(settings, run_id, "worker-a") == "skipped: run is paused"
    assert call(settings, "cancel", run_id).status == "cancelled"
    with pytest.raises(Conflict):
        call(settings, "resume", run_id)
    assert events(settings, run_id)[-2:] == ["run.paused", "run.cancelled"]
