"""Pause, resume and cancel: cooperative between steps, reflected in state and events; a paused
run's checkpoint loads and resume continues from it. (The HTTP side is in test_api.)"""

import pytest
from run_control import act, event_types, execute_in_thread, wait_for_step
from sqlalchemy import func, select

from service.db import session_scope
from service.errors import Conflict
from service.models import Checkpoint, Metric, Run, RunEvent
from workers.execute import execute_run

from factories import WORKER_S, submit

pytestmark = pytest.mark.both_backends

STEPS = 8


def test_pause_resume_cancel(settings, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    run_id = submit(
        settings,
        tiny_model_dir,
        training={"steps": STEPS},
        checkpoint={"every_steps": 100, "keep_last": None},
    )
    worker, result = execute_in_thread(settings, run_id, "worker-a")
    wait_for_step(settings, run_id, 2)  # pause once the run is under way
    assert act(settings, "pause", run_id).pause_requested
    worker.join(timeout=WORKER_S)
    assert result["status"] == "paused"

    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
        assert (run.status, run.lease_owner, run.pause_requested) == ("paused", None, False)
        paused_at = run.step
        ckpt = session.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id)).one()
    assert 2 <= paused_at < STEPS and ckpt.step == paused_at
    AutoModelForCausalLM.from_pretrained(ckpt.path)  # the paused run's checkpoint loads
    assert event_types(settings, run_id)[-3:] == [
        "run.pause_requested",
        "checkpoint.saved",
        "run.paused",
    ]
    # A stale delivery of the task does not wake a paused run.
    assert execute_run(settings, run_id, "worker-x") == "skipped: run is paused"
    with pytest.raises(Conflict):
        act(settings, "pause", run_id)

    assert act(settings, "resume", run_id).status == "queued"
    with pytest.raises(Conflict):
        act(settings, "resume", run_id)
    assert execute_run(settings, run_id, "worker-b") == "succeeded"
    types = event_types(settings, run_id)
    assert types[types.index("run.paused") + 1 :][:4] == [
        "run.resume_requested",
        "run.started",
        "run.resumed",
        "run.model_loaded",
    ]
    with session_scope(settings.resolved_database_url) as session:
        resumed = session.scalars(
            select(RunEvent).where(RunEvent.run_id == run_id, RunEvent.type == "run.resumed")
        ).one()
        assert resumed.data["step"] == paused_at
        per_step = session.execute(
            select(Metric.step, func.count())
            .where(Metric.run_id == run_id, Metric.name == "loss")
            .group_by(Metric.step)
        ).all()
    assert sorted(per_step) == [(s, 1) for s in range(1, STEPS + 1)]
    with pytest.raises(Conflict):
        act(settings, "cancel", run_id)  # succeeded is final


def test_queued_run_pauses_at_once_and_cancels_from_paused(settings, tiny_model_dir):
    run_id = submit(settings, tiny_model_dir)
    assert act(settings, "pause", run_id).status == "paused"
    assert execute_run(settings, run_id, "worker-a") == "skipped: run is paused"
    assert act(settings, "cancel", run_id).status == "cancelled"
    with pytest.raises(Conflict):
        act(settings, "resume", run_id)
    assert event_types(settings, run_id)[-2:] == ["run.paused", "run.cancelled"]
