"""Many requests and workers changing the same runs at once. Every change is a compare-and-set
on the run's row, so the end is always a state the contract allows, a cancel is never undone,
a run keeps one task message however often it is paused and resumed, and a queued run always
has the message that starts it."""

import random
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from run_control import act, event_types, run_row

from service.contract.events import EventType
from service.contract.states import STATES, TERMINAL, RunStatus
from service.errors import Conflict
from workers.records import RunRecorder

from factories import broker_messages, submit

pytestmark = pytest.mark.both_backends

RUNS, CHANGES, THREADS = 10, 1000, 16
ACTIONS = ("pause", "resume", "cancel")
# After a run's cancel, nothing may start, queue or end it again.
NOT_AFTER_CANCEL = {
    EventType.RUN_STARTED,
    EventType.RUN_RESUME_REQUESTED,
    EventType.RUN_PAUSED,
    EventType.RUN_SUCCEEDED,
    EventType.RUN_FAILED,
}


def change(settings, action: str, run_id: str) -> str:
    try:
        act(settings, action, run_id)
    except Conflict:
        return "409"
    return "200"


def deliver(settings, run_id: str) -> str:
    """A worker receiving the run's current message (or, one time in four, a stale one): it
    claims the run and at once honours a cancel or pause asked meanwhile, or finishes it."""
    task_id = run_row(settings, run_id).dispatch_id
    if task_id is None or random.random() < 0.25:
        task_id = f"task_stale_{uuid.uuid4().hex}"
    recorder = RunRecorder(settings, run_id, f"worker-{uuid.uuid4().hex[:8]}")
    spec, _why = recorder.claim(task_id)
    if spec is None:
        return "skipped"
    row = run_row(settings, run_id)
    if row.cancel_requested:
        recorder.finish(RunStatus.CANCELLED, "run cancelled on request")
    elif row.pause_requested:
        recorder.pause(row.step)
    else:
        recorder.finish(RunStatus.SUCCEEDED, "run finished")
    return "trained"


def race(settings, work: list[tuple]) -> Counter:
    with ThreadPoolExecutor(THREADS) as pool:
        return Counter(pool.map(lambda job: job[0](settings, *job[1:]), work))


def check_histories(settings, runs: list[str]) -> None:
    for run_id in runs:
        row, types = run_row(settings, run_id), event_types(settings, run_id)
        assert row.status in STATES
        ends = [t for t in types if t in (EventType.RUN_CANCELLED, EventType.RUN_SUCCEEDED)]
        assert len(ends) <= 1, (run_id, types)
        if EventType.RUN_CANCELLED in types:
            after = types[types.index(EventType.RUN_CANCELLED) + 1 :]
            assert row.status == RunStatus.CANCELLED, (run_id, types)
            assert not NOT_AFTER_CANCEL & set(after), (run_id, types)
        if row.status in TERMINAL:
            assert row.finished_at is not None and ends


def test_random_concurrent_changes_never_undo_a_cancel_nor_add_messages(settings, tiny_model_dir):
    runs = [submit(settings, tiny_model_dir) for _ in range(RUNS)]
    rng = random.Random(20261202)
    work = [(change, rng.choice(ACTIONS), rng.choice(runs)) for _ in range(CHANGES)]

    answers = race(settings, work)

    assert answers["200"] and answers["409"], answers
    check_histories(settings, runs)
    # paused before any worker took it, a resumed run is started by the message it already had
    assert Counter(run_id for run_id, _ in broker_messages(settings)) == Counter(runs)


def test_workers_racing_the_api_leave_every_queued_run_its_one_live_message(
    settings, tiny_model_dir
):
    runs = [submit(settings, tiny_model_dir) for _ in range(RUNS)]
    rng = random.Random(7)
    work = [
        (deliver, rng.choice(runs))
        if rng.random() < 0.3
        else (change, rng.choice(ACTIONS), rng.choice(runs))
        for _ in range(CHANGES)
    ]

    answers = race(settings, work)

    assert answers["trained"] and answers["skipped"], answers
    check_histories(settings, runs)
    messages = broker_messages(settings)
    for run_id in runs:
        row = run_row(settings, run_id)
        live = [task for run, task in messages if run == run_id and task == row.dispatch_id]
        assert len(live) <= 1
        if row.status == RunStatus.QUEUED:  # nothing strands it: its message is waiting
            assert live, (run_id, row.dispatch_id, event_types(settings, run_id))


STALE_DELIVERY = """
import json, sys
from workers.tasks import run_task

outcome = run_task.apply(args=[sys.argv[1]], task_id=sys.argv[2]).get()
print(json.dumps({"outcome": outcome, "torch": "torch" in sys.modules}))
"""


def test_a_superseded_message_exits_before_any_model_library_loads(settings, tiny_model_dir):
    """What a worker does with a message its run no longer names: a fresh interpreter runs
    the real task on it and has not imported torch when the task returns."""
    import json
    import os
    import subprocess
    import sys

    run_id = submit(settings, tiny_model_dir)
    live = run_row(settings, run_id).dispatch_id
    env = {**os.environ, "GVPO_DATABASE_URL": settings.resolved_database_url}
    out = subprocess.run(
        [sys.executable, "-c", STALE_DELIVERY, run_id, "task_superseded"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer == {"outcome": f"skipped: superseded by task {live}", "torch": False}
    assert run_row(settings, run_id).status == RunStatus.QUEUED  # its live message starts it
