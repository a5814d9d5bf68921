"""Runs that span machines (resources.nodes): real `gvpo worker` processes on loopback take the
run and its gang messages from the broker, join one c10d rendezvous and train as one
data-parallel job (gloo on CPU); the run ends with the weights one worker's two processes make
on the same groups, and a machine lost mid-run puts the run back in the queue to resume from
its checkpoint on a fresh gang."""

import contextlib
import os
import signal

import pytest
from run_control import event_types, final_weights, run_row
from sqlalchemy import select

from service.db import session_scope
from service.models import RunEvent
from service.runs.admission import schedule
from workers.execute import execute_run

from factories import WORKER_S, submit, wait_until
from services import process_tree, running_worker

pytestmark = pytest.mark.slow

STEPS = 12
REWARD = {"type": "builtin", "name": "regex", "params": {"pattern": "[a-z]"}}


@pytest.fixture
def gang_settings(settings):
    return settings.model_copy(update={"node_address": "127.0.0.1", "gang_join_timeout_s": 120})


def _run(settings, tiny_model_dir, resources: dict) -> str:
    """A run of two training processes, on one machine or two."""
    return submit(
        settings,
        tiny_model_dir,
        reward=REWARD,
        resources=resources,
        optimizer={"lr": 1e-2},
        algorithm={"group_size": 4, "beta": 0.05},
        sampling={"max_new_tokens": 12},
        training={"steps": STEPS, "prompts_per_step": 4, "mini_batches": 2},
        checkpoint={"every_steps": 3, "keep_last": None},
    )


def _until_ended(settings, run_id: str) -> str:
    """Wait for the run to end, making the scheduler's passes meanwhile (as the API does), so
    that a run back in the queue is let through again."""

    def ended() -> bool:
        schedule(settings)
        return run_row(settings, run_id).status in ("succeeded", "failed", "cancelled")

    wait_until(ended, 4 * WORKER_S, f"run {run_id} to end", every=0.5)
    return run_row(settings, run_id).status


def _same_weights(settings, a: str, b: str) -> float:
    wa, wb = final_weights(settings, a, STEPS), final_weights(settings, b, STEPS)
    return max((wa[n] - wb[n]).abs().max().item() for n in wa)


def test_a_two_machine_run_trains_as_two_processes_of_one(gang_settings, tiny_model_dir, tmp_path):
    settings = gang_settings
    one = _run(settings, tiny_model_dir, {"processes": 2})
    assert execute_run(settings, one, "worker-0") == "succeeded"
    two = _run(settings, tiny_model_dir, {"nodes": 2, "processes": 1})
    with (
        running_worker(settings, tmp_path / "a.log"),
        running_worker(settings, tmp_path / "b.log"),
    ):
        assert _until_ended(settings, two) == "succeeded"
    types = event_types(settings, two)
    assert types.count("run.launched") == 1 and types.count("run.gang_joined") == 1
    assert _same_weights(settings, one, two) < 1e-6


def test_a_lost_machine_resumes_the_gang_from_its_checkpoint(
    gang_settings, tiny_model_dir, tmp_path
):
    settings = gang_settings
    one = _run(settings, tiny_model_dir, {"processes": 2})
    assert execute_run(settings, one, "worker-0") == "succeeded"
    two = _run(settings, tiny_model_dir, {"nodes": 2, "processes": 1})
    with contextlib.ExitStack() as workers:
        procs = [
            workers.enter_context(running_worker(settings, tmp_path / f"{name}.log"))
            for name in ("a", "b")
        ]
        wait_until(
            lambda: "checkpoint.saved" in event_types(settings, two),
            WORKER_S,
            "the gang's first checkpoint",
            every=0.05,
        )
        with session_scope(settings.resolved_database_url) as session:
            joined = session.scalars(
                select(RunEvent).where(RunEvent.run_id == two, RunEvent.type == "run.gang_joined")
            ).one()
        member_pid = int(joined.data["worker"].split(":")[1])
        (member,) = [p for p in procs if member_pid in process_tree(p.pid)]
        os.killpg(member.pid, signal.SIGKILL)  # the machine that joined is lost
        workers.enter_context(running_worker(settings, tmp_path / "c.log"))  # a fresh one
        assert _until_ended(settings, two) == "succeeded"
    with session_scope(settings.resolved_database_url) as session:
        requeued = session.scalars(
            select(RunEvent).where(RunEvent.run_id == two, RunEvent.type == "run.requeued")
        ).one()
        resumed = session.scalars(
            select(RunEvent).where(RunEvent.run_id == two, RunEvent.type == "run.resumed")
        ).all()
    assert requeued.data["gang"] and "broke up" in requeued.message
    assert [e.data["step"] for e in resumed] == [requeued.data["checkpoint_step"]]
    assert resumed[0].data["step"] in range(3, STEPS, 3)
    assert _same_weights(settings, one, two) < 1e-6
