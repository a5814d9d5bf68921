"""Who gets the workers: projects share a queue fairly, resources.priority orders a project's own
runs, and a project's quota holds its runs back (queued, saying why, never failed) until it
has room. Messages are taken from the real broker as a worker takes them, and claimed by the
worker's own code; a budget spent mid-run pauses a real run with a checkpoint."""

import pytest
from run_control import act, event_types, execute_in_thread, run_row, wait_for_step
from sqlalchemy import select

from service.contract.states import RunStatus
from service.db import session_scope
from service.models import Checkpoint, Project, Run, RunEvent
from service.runs.admission import schedule
from service.usage.service import set_quota
from workers.records import RunRecorder

from factories import WORKER_S, broker_messages, submit, take_message, wait_until

pytestmark = pytest.mark.both_backends

ONE_STEP = {"training": {"steps": 1, "prompts_per_step": 2}}


def _quota(settings, project: str, **limits) -> None:
    with session_scope(settings.resolved_database_url) as session:
        set_quota(session, project, limits)


def _project_of(settings, run_id: str) -> str:
    with session_scope(settings.resolved_database_url) as session:
        return session.get(Project, session.get(Run, run_id).project_id).name


def _deliver(settings, worker: str) -> RunRecorder:
    """The broker's next message, delivered to `worker` and claimed: the recorder of the run it
    started (which may not be the run the message names)."""
    taken = take_message(settings)
    assert taken is not None, "no message waiting in the broker"
    recorder = RunRecorder(settings, taken[0], worker)
    spec, why = recorder.claim(taken[1])
    assert spec is not None, why
    return recorder


def _waiting_events(settings, run_id: str) -> list[RunEvent]:
    with session_scope(settings.resolved_database_url) as session:
        return list(
            session.scalars(
                select(RunEvent).where(RunEvent.run_id == run_id, RunEvent.type == "run.waiting")
            )
        )


def test_two_projects_flooding_one_queue_take_turns(settings, tiny_model_dir):
    flood = {
        name: [submit(settings, tiny_model_dir, project_name=name, **ONE_STEP) for _ in range(5)]
        for name in ("alpha", "beta")
    }
    assert len(broker_messages(settings)) == 10  # no quota: every run has its message
    # One worker: each message it takes starts the run whose project was served least
    # recently, although alpha's five messages are all ahead of beta's in the broker.
    served = []
    for _ in range(6):
        recorder = _deliver(settings, "worker-1")
        served.append(_project_of(settings, recorder.run_id))
        recorder.finish(RunStatus.SUCCEEDED, "done")
    assert served == ["alpha", "beta"] * 3
    # Two workers at once: the second message goes to the project holding no device.
    first = _deliver(settings, "worker-1")
    second = _deliver(settings, "worker-2")
    assert {_project_of(settings, r.run_id) for r in (first, second)} == {"alpha", "beta"}
    # The runs passed over kept a message each: every queued run still holds one.
    with session_scope(settings.resolved_database_url) as session:
        queued = session.scalars(select(Run).where(Run.status == RunStatus.QUEUED)).all()
        assert len(queued) == 2 and all(run.dispatch_id for run in queued)
    assert {run.dispatch_id for run in queued} == {task for _, task in broker_messages(settings)}
    assert {run.id for run in queued} <= set(flood["alpha"]) | set(flood["beta"])


def test_priority_orders_a_projects_runs_but_not_its_share(settings, tiny_model_dir):
    low = submit(settings, tiny_model_dir, project_name="alpha", **ONE_STEP)
    high = submit(
        settings, tiny_model_dir, project_name="alpha", resources={"priority": 50}, **ONE_STEP
    )
    other = submit(settings, tiny_model_dir, project_name="beta", **ONE_STEP)
    order = []
    for _ in range(3):
        recorder = _deliver(settings, "worker-1")
        order.append(recorder.run_id)
        recorder.finish(RunStatus.SUCCEEDED, "done")
    # alpha's first turn goes to its high-priority run; its priority does not buy a second
    # turn before beta's.
    assert order == [high, other, low]


def test_a_project_at_its_run_limit_waits_queued_with_the_reason(settings, tiny_model_dir):
    submit(settings, tiny_model_dir, project_name="alpha", **ONE_STEP)  # makes the project
    _quota(settings, "alpha", max_concurrent_runs=2)
    runs = [submit(settings, tiny_model_dir, project_name="alpha", **ONE_STEP) for _ in range(2)]
    # the first run and runs[0] hold the project's two places; runs[1] waits for one
    assert len(broker_messages(settings)) == 2
    waiting = runs[1]
    assert run_row(settings, waiting).status == RunStatus.QUEUED
    (event,) = _waiting_events(settings, waiting)
    assert "max_concurrent_runs 2" in event.message and event.data["limit"] == "max_concurrent_runs"
    assert event.data["use"]["runs"] == 2
    schedule(settings)  # a later pass with nothing changed says nothing new
    assert len(_waiting_events(settings, waiting)) == 1
    # a worker starts one; still no room until it ends
    recorder = _deliver(settings, "worker-1")
    assert schedule(settings) == []
    recorder.finish(RunStatus.SUCCEEDED, "done")
    assert schedule(settings) == [waiting]
    assert "run.admitted" in event_types(settings, waiting)
    assert waiting in {run for run, _ in broker_messages(settings)}
    assert run_row(settings, waiting).waiting_reason is None


def test_a_run_larger_than_the_free_devices_waits_and_holds_back_those_behind(
    settings, tiny_model_dir
):
    submit(settings, tiny_model_dir, project_name="alpha", **ONE_STEP)
    _quota(settings, "alpha", max_gpus=2)
    two = {"resources": {"processes": 2}}
    big = submit(settings, tiny_model_dir, project_name="alpha", **two, **ONE_STEP)
    small = submit(settings, tiny_model_dir, project_name="alpha", **ONE_STEP)
    assert len(broker_messages(settings)) == 1  # the first run's: 1 of 2 devices held
    recorder = _deliver(settings, "worker-1")
    schedule(settings)
    assert run_row(settings, big).status == RunStatus.QUEUED
    (event,) = _waiting_events(settings, big)
    assert event.data["limit"] == "max_gpus" and "needs 2" in event.message
    # the small run would fit, but waits behind the older one rather than pass it for ever
    assert len(broker_messages(settings)) == 0
    assert "behind run " + big in run_row(settings, small).waiting_reason
    recorder.finish(RunStatus.SUCCEEDED, "done")
    assert schedule(settings) == [big]  # and small waits for big's devices
    assert run_row(settings, small).waiting_reason.startswith("max_gpus: ")


def test_a_spent_budget_pauses_a_running_run_with_a_checkpoint(settings, tiny_model_dir):
    run_id = submit(
        settings,
        tiny_model_dir,
        project_name="alpha",
        training={"steps": 40, "prompts_per_step": 2},
        checkpoint={"every_steps": 100, "keep_last": None},
    )
    worker, result = execute_in_thread(settings, run_id, "worker-a")
    wait_for_step(settings, run_id, 2)
    _quota(settings, "alpha", gpu_hours=1e-6)  # spent by now: usage is written each step
    schedule(settings)
    worker.join(timeout=WORKER_S)
    assert result["status"] == "paused"
    run = run_row(settings, run_id)
    assert run.status == RunStatus.PAUSED and run.error is None
    with session_scope(settings.resolved_database_url) as session:
        ckpt = session.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id)).one()
        asked = session.scalars(
            select(RunEvent).where(
                RunEvent.run_id == run_id, RunEvent.type == "run.pause_requested"
            )
        ).one()
    assert ckpt.step == run.step and "budget" in asked.message
    # resumed while the budget is spent: queued, waiting, no message
    act(settings, "resume", run_id)
    wait_until(lambda: _waiting_events(settings, run_id), WORKER_S, "the run.waiting event")
    assert _waiting_events(settings, run_id)[-1].data["limit"] == "gpu_hours"
    assert run_row(settings, run_id).dispatch_id is None
    # its first message (still in the broker: this test started it without one) starts nothing
    stale_run, stale_task = take_message(settings)
    assert stale_run == run_id
    spec, why = RunRecorder(settings, run_id, "worker-b").claim(stale_task)
    assert spec is None and "quota" in why
    # the operator raises the budget: the next pass lets it through
    _quota(settings, "alpha", gpu_hours=None)
    assert schedule(settings) == [run_id]
