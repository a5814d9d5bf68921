"""Async GVPO (training.max_lag, workers/ahead.py): step t's groups are sampled with the weights
after step t-1-max_lag while the learner trains. Its schedule is fixed, so a pause, an
evaluation or a checkpoint in the middle changes nothing: the run ends with the weights an
uninterrupted one has. (Resume after SIGKILL: test_resume.py; vLLM's log-probs against the
lagged weights: test_resume.py's vLLM test.)"""

import time

import pytest
from pydantic import ValidationError
from run_control import act, event_types, execute_in_thread, final_weights, run_row, series
from test_traffic_runs import post, traffic, waiting_run, waits
from transformers import AutoTokenizer

from service.contract.spec import RunSpec, TrainingSpec
from workers import run_loop
from workers.execute import execute_run

from factories import WORKER_S, copy_rows, run_spec, submit, wait_until

STEPS = 10  # long enough for a pause to land mid-run on a loaded machine


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch):
    monkeypatch.setattr(run_loop, "WAIT_POLL_S", 0.05)


def async_run(settings, tiny_model_dir, max_lag: int, steps: int = STEPS, **sections) -> str:
    return submit(
        settings,
        tiny_model_dir,
        reward={"type": "builtin", "name": "regex", "params": {"pattern": "[a-z]"}},
        optimizer={"lr": 1e-2},
        algorithm={"group_size": 4, "beta": 0.05, "reference": "sampling"},
        training={"steps": steps, "prompts_per_step": 4, "mini_batches": 2, "max_lag": max_lag},
        checkpoint={"every_steps": 100, "keep_last": None},
        eval_rows=copy_rows(3),
        eval={"every_steps": 3, "samples_per_prompt": 2, "k": 1},
        **sections,
    )


def test_a_paused_async_run_ends_as_an_uninterrupted_one(settings, tiny_model_dir):
    """Evaluations every 3 steps and a pause at some step in between: the same final weights
    as the same run left alone; each step reports its lag and both sides' idle time."""
    straight = async_run(settings, tiny_model_dir, max_lag=2)
    assert execute_run(settings, straight, "worker-a") == "succeeded"
    assert series(settings, straight, "async/lag_mean") == {
        s: float(min(s - 1, 2)) for s in range(1, STEPS + 1)
    }
    for name in ("time/step_s", "async/learner_idle_s", "async/rollout_idle_s"):
        assert sorted(series(settings, straight, name)) == list(range(1, STEPS + 1)), name
    assert sorted(series(settings, straight, "eval/pass@1")) == [3, 6, 9, 10]

    paused = async_run(settings, tiny_model_dir, max_lag=2)
    worker, result = execute_in_thread(settings, paused, "worker-a")
    wait_until(lambda: run_row(settings, paused).step >= 1, WORKER_S, "step 1", every=0.01)
    act(settings, "pause", paused)
    worker.join(timeout=WORKER_S)
    assert result["status"] == "paused"
    assert 1 <= run_row(settings, paused).step < STEPS
    act(settings, "resume", paused)
    assert execute_run(settings, paused, "worker-b") == "succeeded"

    a, b = final_weights(settings, straight, STEPS), final_weights(settings, paused, STEPS)
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-6
    assert series(settings, paused, "eval/pass@1") == series(settings, straight, "eval/pass@1")


def test_the_lag_changes_what_trains(settings, tiny_model_dir):
    """max_lag 1 samples step 2 with the starting weights, where the synchronous loop samples it
    with step 1's: the same first step, then different runs."""
    runs = {lag: async_run(settings, tiny_model_dir, max_lag=lag) for lag in (0, 1)}
    for run_id in runs.values():
        assert execute_run(settings, run_id, "worker-a") == "succeeded"
    rewards = {lag: series(settings, run_id, "reward/mean") for lag, run_id in runs.items()}
    assert rewards[0][1] == rewards[1][1]
    a, b = (final_weights(settings, run_id, STEPS) for run_id in runs.values())
    assert max((a[n] - b[n]).abs().max().item() for n in a) > 1e-4


def test_an_async_step_waits_for_posted_groups_and_a_pause_ends_the_wait(settings, tiny_model_dir):
    """The producer waits for a posted group, longer than the step timeout (waiting is no
    phase); the learner trains step 1 as soon as one is posted, and a pause while step 2's
    job waits stops the run with a checkpoint."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    run_id = waiting_run(
        settings,
        tiny_model_dir,
        training={"max_lag": 1},
        resources={"step_timeout_s": 1.0},
    )
    worker, result = execute_in_thread(settings, run_id, "worker-a")
    wait_until(lambda: len(waits(settings, run_id)) >= 1, WORKER_S, "a wait", every=0.02)
    time.sleep(2.5)  # longer than the step timeout, with the heartbeat's 1 s to look
    assert worker.is_alive() and run_row(settings, run_id).step == 0

    post(settings, run_id, traffic(tokenizer, weights_step=0))
    wait_until(lambda: run_row(settings, run_id).step >= 1, WORKER_S, "step 1", every=0.02)
    wait_until(lambda: len(waits(settings, run_id)) >= 2, WORKER_S, "step 2's wait", every=0.02)
    act(settings, "pause", run_id)
    worker.join(timeout=WORKER_S)
    assert result["status"] == "paused"
    assert [w["step"] for w in waits(settings, run_id)] == [1, 2]
    assert event_types(settings, run_id)[-2:] == ["checkpoint.saved", "run.paused"]


def test_an_async_run_is_cancelled_while_it_runs(settings, tiny_model_dir):
    run_id = async_run(settings, tiny_model_dir, max_lag=1, steps=50)
    worker, result = execute_in_thread(settings, run_id, "worker-a")
    wait_until(lambda: run_row(settings, run_id).step >= 1, WORKER_S, "step 1", every=0.01)
    act(settings, "cancel", run_id)
    worker.join(timeout=WORKER_S)
    assert result["status"] == "cancelled" and run_row(settings, run_id).step < 50


def test_max_lag_is_bounded_and_refused_with_a_tensor_parallel_engine(tiny_model_dir):
    with pytest.raises(ValidationError, match="max_lag"):
        TrainingSpec(max_lag=9)
    spec = run_spec(
        tiny_model_dir,
        "file_x",
        training={"max_lag": 1},
        resources={"processes": 2},
        rollout={"engine": "vllm", "tensor_parallel_size": 2},
    )
    with pytest.raises(ValidationError, match="max_lag samples on a thread of its own"):
        RunSpec.model_validate(spec)
    del spec["rollout"]  # data parallel: each process samples on a thread of its own
    assert RunSpec.model_validate(spec).training.max_lag == 1


def test_an_async_run_makes_one_update_a_step_unless_told():
    assert TrainingSpec(max_lag=1).mini_batches == 1
    assert TrainingSpec(max_lag=1, mini_batches=4).mini_batches == 4
    assert TrainingSpec().mini_batches == 4
