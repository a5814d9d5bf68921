"""The run loop in-process (no Celery): records, checkpoints, failures, cancel, leases."""

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from run_control import execute_in_thread, run_row, wait_for_step
from sqlalchemy import func, select

from service.db import session_scope
from service.models import Checkpoint, Metric, Run, RunEvent, Sample
from service.runs.control import cancel_run
from workers.execute import execute_run
from workers.records import RunRecorder

from factories import STANDARD_METRICS, WORKER_S, submit

pytestmark = pytest.mark.both_backends

STEP_METRICS = {*STANDARD_METRICS, "groups/zero_variance_frac"}


def events(settings, run_id) -> list[RunEvent]:
    with session_scope(settings.resolved_database_url) as session:
        stmt = select(RunEvent).where(RunEvent.run_id == run_id).order_by(RunEvent.id)
        return list(session.scalars(stmt))


def test_run_records_every_step_and_checkpoints(settings, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    # A reward most random completions earn and some miss, so groups have spread and train
    # (the copy task's char_accuracy is 0 for nearly every sample of a random model).
    run_id = submit(
        settings,
        tiny_model_dir,
        reward={"type": "builtin", "name": "regex", "params": {"pattern": "[a-z]"}},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded"

    run = run_row(settings, run_id)
    assert (run.status, run.step, run.lease_owner) == ("succeeded", 6, None)
    assert run.samples_generated == 6 * 2 * 4 and run.tokens_generated > 0
    with session_scope(settings.resolved_database_url) as session:
        for name in STEP_METRICS:
            steps = session.scalars(
                select(Metric.step)
                .where(Metric.run_id == run_id, Metric.name == name)
                .order_by(Metric.step)
            ).all()
            assert steps == [1, 2, 3, 4, 5, 6], name
        assert session.scalar(select(func.count()).select_from(Sample)) == 48
        last_reward = session.get(Metric, (run_id, "reward/mean", 6)).value
        tokens = session.get(Metric, (run_id, "tokens/total", 6)).value
        samples = session.scalars(
            select(Sample).order_by(Sample.step, Sample.group_index, Sample.sample_index)
        ).all()
    assert tokens == run.tokens_generated
    # each completion's GVPO weight is w_i = (R_i - mean R) - beta*(s_i - mean s) of its group
    groups: dict[tuple[int, int], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.step, s.group_index), []).append(s)
    trained = [g for g in groups.values() if g[0].weight is not None]
    assert trained and all(s.logratio is not None for g in trained for s in g)
    for group in trained:
        r_mean = sum(s.reward for s in group) / len(group)
        s_mean = sum(s.logratio for s in group) / len(group)
        for s in group:
            expected = (s.reward - r_mean) - 0.05 * (s.logratio - s_mean)  # COPY_TASK beta
            assert s.weight == pytest.approx(expected, abs=1e-5)
    skipped = [g for g in groups.values() if g[0].weight is None]
    assert all(len({s.reward for s in g}) == 1 for g in skipped)  # zero-variance: not trained
    assert run.reward == last_reward  # the run carries its last step's mean reward
    with session_scope(settings.resolved_database_url) as session:
        ckpts = session.scalars(select(Checkpoint).where(Checkpoint.run_id == run_id)).all()
    assert [c.step for c in ckpts] == [6]  # keep_last=1 pruned step 3, files included
    ckpt_dir = Path(ckpts[0].path)
    assert not (ckpt_dir.parent / "step_000003").exists()
    state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["data_cursor"]["position"] > 0
    assert (ckpt_dir / "optimizer.pt").is_file() and (ckpt_dir / "model.safetensors").is_file()

    trained = AutoModelForCausalLM.from_pretrained(ckpt_dir)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [
        not torch.equal(a, b)
        for a, b in zip(trained.state_dict().values(), initial.state_dict().values(), strict=True)
    ]
    assert any(changed)
    types = [e.type for e in events(settings, run_id)]
    assert types[:3] == ["run.queued", "run.started", "run.model_loaded"]
    assert types.count("checkpoint.saved") == 2 and types[-1] == "run.succeeded"


def test_lora_run_saves_peft_adapters(settings, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_id = submit(
        settings,
        tiny_model_dir,
        model={"lora": {"r": 4, "alpha": 8}},
        optimizer={"lr": 1e-2},
        checkpoint={"keep_last": None},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    with session_scope(settings.resolved_database_url) as session:
        ckpts = session.scalars(
            select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.step)
        ).all()
    assert [(c.step, c.kind) for c in ckpts] == [(3, "lora_adapter"), (6, "lora_adapter")]
    final = Path(ckpts[-1].path)
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final)
    ids = torch.tensor([[16, 17, 18, 65]])
    assert not torch.allclose(tuned(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo"])
def test_baselines_train_in_the_same_loop(settings, tiny_model_dir, algorithm):
    run_id = submit(settings, tiny_model_dir, algorithm={"name": algorithm, "beta": 0.0})
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    assert run_row(settings, run_id).step == 6


def test_missing_model_path_fails_with_an_event(settings, tmp_path):
    missing = tmp_path / "no-such-model"
    # The API refuses it at submission where it can see the path; a cluster's API may not,
    # and a model can go after submission: the worker must still fail the run saying why.
    run_id = submit(settings.model_copy(update={"model_path_check": "off"}), missing)
    assert execute_run(settings, run_id, "worker-a") == "failed"
    run = run_row(settings, run_id)
    assert run.status == "failed" and run.finished_at is not None
    assert str(missing) in run.error and "does not exist" in run.error
    last = events(settings, run_id)[-1]
    assert (last.type, last.level) == ("run.failed", "error")
    assert str(missing) in last.message


def test_an_unexpected_failure_names_an_error_id_and_keeps_the_traceback_in_the_log(
    settings, tiny_model_dir, tmp_path, caplog
):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")  # fails inside the loader
    run_id = submit(settings.model_copy(update={"model_path_check": "off"}), broken)
    assert execute_run(settings, run_id, "worker-a") == "failed"
    last = events(settings, run_id)[-1]
    assert last.type == "run.failed" and set(last.data) == {"exception", "error_id"}
    error_id = last.data["error_id"]
    assert error_id.startswith("err_") and error_id not in last.message
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and logged[0].exc_info  # the traceback: in the worker's log only


def test_cancel_is_honoured_between_steps(settings, tiny_model_dir):
    run_id = submit(settings, tiny_model_dir, training={"steps": 500})
    worker, outcome = execute_in_thread(settings, run_id, "worker-a")
    wait_for_step(settings, run_id, 2)
    with session_scope(settings.resolved_database_url) as session:
        project_id = session.get(Run, run_id).project_id
        from service.models import Project

        cancel_run(session, session.get(Project, project_id), run_id)
    worker.join(timeout=WORKER_S)
    run = run_row(settings, run_id)
    assert outcome["status"] == "cancelled" and run.status == "cancelled"
    assert 2 <= run.step < 500
    types = [e.type for e in events(settings, run_id)]
    assert "run.cancel_requested" in types and types[-1] == "run.cancelled"


def test_duplicate_delivery_exits_while_a_live_lease_exists(settings, tiny_model_dir):
    run_id = submit(settings, tiny_model_dir)
    spec, _ = RunRecorder(settings, run_id, "worker-a").claim()
    assert spec is not None
    outcome = execute_run(settings, run_id, "worker-b")
    assert outcome.startswith("skipped: run is leased by worker-a")
    run = run_row(settings, run_id)
    assert (run.status, run.lease_owner, run.step) == ("running", "worker-a", 0)


def test_racing_deliveries_have_exactly_one_winner(settings, tiny_model_dir):
    run_id = submit(settings, tiny_model_dir)
    barrier, wins = threading.Barrier(4), []

    def deliver(i: int) -> None:
        barrier.wait()
        wins.append(RunRecorder(settings, run_id, f"worker-{i}").claim()[0] is not None)

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False, False, False, True]
    assert run_row(settings, run_id).attempts == 1


def test_finished_run_is_not_run_again(settings, tiny_model_dir):
    run_id = submit(settings, tiny_model_dir, training={"steps": 1})
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    assert execute_run(settings, run_id, "worker-b") == "skipped: run is already succeeded"


def test_replayed_step_overwrites_instead_of_duplicating(settings, tiny_model_dir):
    run_id = submit(settings, tiny_model_dir)
    recorder = RunRecorder(settings, run_id, "worker-a")
    sample = {
        "group_index": 0,
        "sample_index": 0,
        "prompt": "abc=",
        "completion": "ab",
        "answer": "abc",
        "reward": 0.5,
    }
    recorder.record_step(1, {"loss": 1.0}, [sample], tokens=3)
    recorder.record_step(1, {"loss": 2.0}, [{**sample, "reward": 0.9}], tokens=3)
    with session_scope(settings.resolved_database_url) as session:
        values = select(Metric.name, Metric.value).where(Metric.run_id == run_id)
        assert dict(session.execute(values).all()) == {"loss": 2.0, "tokens/total": 3.0}
        assert session.scalars(select(Sample.reward).where(Sample.run_id == run_id)).all() == [0.9]
        assert session.get(Run, run_id).tokens_generated == 3


def test_concurrent_writes_of_one_step_never_conflict(settings, tiny_model_dir):
    """Two writers of the same step at once (a stale worker and its replacement, both
    replaying it): the upserts are INSERT ... ON CONFLICT DO UPDATE, so neither fails on the
    unique key and each (run, step, name) / (run, step, group, sample) stays one row."""
    from concurrent.futures import ThreadPoolExecutor

    run_id = submit(settings, tiny_model_dir)
    writers = [RunRecorder(settings, run_id, f"worker-{n}") for n in range(4)]
    samples = [
        {
            "group_index": g,
            "sample_index": i,
            "prompt": "p",
            "completion": "c",
            "answer": "a",
            "reward": 0.0,
        }
        for g in range(8)
        for i in range(8)
    ]

    def write(n: int) -> None:
        writers[n % 4].record_step(
            1,
            {"loss": float(n), "reward/mean": float(n)},
            [{**s, "reward": float(n)} for s in samples],
            tokens=1,
        )

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(24)))  # raises if any write failed
    with session_scope(settings.resolved_database_url) as session:
        metrics = session.execute(
            select(Metric.name, Metric.value).where(Metric.run_id == run_id)
        ).all()
        count = session.scalar(
            select(func.count()).select_from(Sample).where(Sample.run_id == run_id)
        )
    assert sorted(name for name, _ in metrics) == ["loss", "reward/mean", "tokens/total"]
    assert count == 64


def test_large_steps_are_written_in_chunks(settings, tiny_model_dir, backend):
    """One statement per step would pass the database's limit on bound parameters: SQLite's
    stock 32766, PostgreSQL's 65535."""
    import sqlite3

    from sqlalchemy import event

    from service.db import get_engine

    run_id = submit(settings, tiny_model_dir)
    groups = 64
    if backend == "sqlite":
        engine = get_engine(settings.resolved_database_url)  # this test's own database
        engine.dispose()
        # SQLite's stock limit on bound parameters (this machine's build allows more).
        event.listen(
            engine,
            "connect",
            lambda conn, _: conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 32766),
        )
    else:
        groups = 128
    rows = [
        {
            "group_index": g,
            "sample_index": i,
            "prompt": "p",
            "completion": "c",
            "answer": "a",
            "reward": 0.0,
        }
        for g in range(groups)
        for i in range(64)
    ]  # x 9 columns
    RunRecorder(settings, run_id, "worker-a").record_step(1, {"loss": 0.0}, rows, tokens=1)
    with session_scope(settings.resolved_database_url) as session:
        assert session.scalar(select(func.count()).select_from(Sample)) == groups * 64
