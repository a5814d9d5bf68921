"""The run state machine: one table in the contract, served to clients as it is, and obeyed by
the workers when another actor has moved a run first."""

from sqlalchemy import select

from service.contract.events import EventType
from service.contract.states import ACTIONS, TERMINAL, TRANSITIONS, RunStatus
from service.db import session_scope
from service.models import Project, Run, RunEvent
from service.runs.control import cancel_run
from workers.records import RunRecorder

from factories import submit


def reachable(start: RunStatus) -> set[RunStatus]:
    seen, todo = {start}, [start]
    while todo:
        for target in TRANSITIONS[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_table_is_a_machine_every_run_can_end_in():
    assert set(TRANSITIONS) == set(RunStatus)
    assert reachable(RunStatus.QUEUED) == set(RunStatus)
    assert {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED} == TERMINAL
    for status in set(RunStatus) - TERMINAL:
        assert reachable(status) & TERMINAL == TERMINAL, status
    # an action is offered only where the table lets the run move on from
    for action, states in ACTIONS.items():
        assert not states & TERMINAL, action


def test_the_api_serves_the_contracts_table_without_a_key(api):
    resp = api.get("/v1/run-states")
    assert resp.status_code == 200
    body = resp.json()
    assert body["states"] == [s.value for s in RunStatus]
    assert set(body["terminal"]) == set(TERMINAL)
    assert {s: set(t) for s, t in body["transitions"].items()} == {
        s.value: {t.value for t in targets} for s, targets in TRANSITIONS.items()
    }
    assert {a: set(s) for a, s in body["actions"].items()} == {
        a: {s.value for s in states} for a, states in ACTIONS.items()
    }


def test_a_worker_does_not_move_a_run_someone_else_ended(settings, tiny_model_dir):
    run_id = submit(settings, tiny_model_dir)
    with session_scope(settings.resolved_database_url) as session:
        project = session.get(Project, session.get(Run, run_id).project_id)
        assert cancel_run(session, project, run_id).status == RunStatus.CANCELLED

    recorder = RunRecorder(settings, run_id, "worker-late")
    recorder.finish(RunStatus.SUCCEEDED, "run finished")
    recorder.pause(3)
    recorder.fail("too late to fail")

    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
        assert run.status == RunStatus.CANCELLED and run.error is None
        types = session.scalars(select(RunEvent.type).where(RunEvent.run_id == run_id)).all()
    assert EventType.RUN_SUCCEEDED not in types and EventType.RUN_PAUSED not in types
    assert EventType.RUN_FAILED not in types
