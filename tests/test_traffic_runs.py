"""A run that trains an agent from its own traffic: its steps wait for posted groups
(training.wait_for_groups) and stop promptly when paused or cancelled while waiting, a group of
served completions trains with its staleness reported, and the run publishes its weights for
serving (serving.sync_every_steps) once its model is asked for."""

import time

import pytest
import torch
from run_control import act, event_types, execute_in_thread, run_row
from sqlalchemy import select
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.contract.spec import RunSpec
from service.db import session_scope
from service.models import Checkpoint, Metric, Run, RunEvent, RunGroup, Sample
from service.models.base import utcnow
from workers import run_loop
from workers.execute import execute_run
from workers.records import RunRecorder

from factories import WORKER_S, submit, wait_until

K = 4  # submit()'s group size


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch):
    monkeypatch.setattr(run_loop, "WAIT_POLL_S", 0.05)


def traffic(tokenizer, weights_step: int | None = 0) -> dict:
    """A group of K served one-turn episodes (the stored form), the first of two turns."""
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt, eos = ids("abc="), tokenizer.eos_token_id

    def turn(p: list[int], sampled: str) -> dict:
        return {
            "completion_id": "cmpl_x",
            "prompt_ids": p,
            "token_ids": ids(sampled) + [eos],
            "weights_step": weights_step,
        }

    two_turns = [turn(prompt, "ab"), turn(prompt + ids("ab") + [eos] + ids("\nmore="), "abc")]
    episodes = [{"turns": two_turns, "reward": 1.0}]
    episodes += [{"turns": [turn(prompt, text)], "reward": 0.0} for text in ("x", "yz", "a")]
    return {"traffic": episodes, "source": "agent"}


def waiting_run(settings, model_dir, training: dict | None = None, **sections) -> str:
    """2 groups a step, one of them an off-policy slot that waits for a posted group."""
    return submit(
        settings,
        model_dir,
        training={
            "steps": 3,
            "prompts_per_step": 2,
            "mini_batches": 1,
            "offpolicy_fraction": 0.5,
            "wait_for_groups": True,
            **(training or {}),
        },
        **sections,
    )


def post(settings, run_id: str, body: dict) -> None:
    with session_scope(settings.resolved_database_url) as session:
        session.add(RunGroup(run_id=run_id, body=body))


def waits(settings, run_id: str) -> list[dict]:
    with session_scope(settings.resolved_database_url) as session:
        return list(
            session.scalars(
                select(RunEvent.data)
                .where(RunEvent.run_id == run_id, RunEvent.type == "run.waiting_for_groups")
                .order_by(RunEvent.id)
            )
        )


def wait_for_waits(settings, run_id: str, n: int) -> None:
    wait_until(lambda: len(waits(settings, run_id)) >= n, WORKER_S, f"wait number {n}", every=0.02)


def metrics(settings, run_id: str, step: int) -> dict[str, float]:
    with session_scope(settings.resolved_database_url) as session:
        rows = session.execute(
            select(Metric.name, Metric.value).where(Metric.run_id == run_id, Metric.step == step)
        ).all()
    return dict(rows)


def test_whole_takes_every_slot_or_none(settings, tiny_model_dir):
    run_id = waiting_run(settings, tiny_model_dir)
    recorder = RunRecorder(settings, run_id, "worker-a")
    post(settings, run_id, {"prompt": "g0=", "completions": ["a"] * K})
    assert recorder.take_groups(1, 2, 1, whole=True) == []
    assert recorder.pending_groups(1) == 1  # nothing was taken
    post(settings, run_id, {"prompt": "g1=", "completions": ["a"] * K})
    assert [g["prompt"] for g in recorder.take_groups(1, 2, 1, whole=True)] == ["g0=", "g1="]
    assert recorder.pending_groups(2) == 0 and recorder.pending_groups(1) == 2  # a replay's


def test_a_step_waits_for_its_groups_and_a_pause_ends_the_wait(settings, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    run_id = waiting_run(settings, tiny_model_dir, resources={"step_timeout_s": 1.0})
    worker, result = execute_in_thread(settings, run_id, "worker-a")
    wait_for_waits(settings, run_id, 1)
    # Longer than the step timeout (with the heartbeat's 1 s to look): waiting is no phase.
    time.sleep(2.5)
    assert worker.is_alive() and run_row(settings, run_id).step == 0
    assert waits(settings, run_id) == [{"step": 1, "pending": 0, "needed": 1}]  # one, not a poll's

    post(settings, run_id, traffic(tokenizer, weights_step=0))
    wait_for_waits(settings, run_id, 2)  # step 1 trained it; step 2 waits
    assert run_row(settings, run_id).step == 1
    act(settings, "pause", run_id)
    worker.join(timeout=10)
    assert result["status"] == "paused"
    assert waits(settings, run_id)[1] == {"step": 2, "pending": 0, "needed": 1}
    assert event_types(settings, run_id)[-2:] == ["checkpoint.saved", "run.paused"]

    step = metrics(settings, run_id, 1)
    # served by step 0's weights, trained at step 1: by the very weights that train
    assert (step["offpolicy/staleness_mean"], step["offpolicy/staleness_max"]) == (0.0, 0.0)
    assert step["source/agent/samples"] == K and step["source/agent/reward_mean"] == 0.25
    with session_scope(settings.resolved_database_url) as session:
        samples = session.execute(
            select(Sample.prompt, Sample.completion, Sample.source)
            .where(Sample.run_id == run_id, Sample.group_index == 0)
            .order_by(Sample.sample_index)
        ).all()
    assert samples[0] == ("abc=", "ab</s>\nmore=abc</s>", "agent")
    # Published at the start: the model's own folder, nothing copied.
    row = run_row(settings, run_id)
    assert (row.weights_step, row.weights_path) == (0, str(tiny_model_dir))
    assert not (settings.runs_dir / run_id / "weights").exists()


def ask_for(settings, run_id: str) -> None:
    """What a request naming the run as its model does (service/serving/models.py)."""
    with session_scope(settings.resolved_database_url) as session:
        session.get(Run, run_id).serving_asked_at = utcnow()


def test_a_run_publishes_once_its_model_is_asked_for(settings, tiny_model_dir):
    """Its own chat template: step 0 is not the model folder as it is, so nothing is published
    until a request names the run; then after the next step, though sync_every_steps is 10."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    run_id = waiting_run(settings, tiny_model_dir, model={"chat_template": "{{ messages }}"})
    worker, result = execute_in_thread(settings, run_id, "worker-a")
    wait_for_waits(settings, run_id, 1)
    assert run_row(settings, run_id).weights_path is None
    ask_for(settings, run_id)
    post(settings, run_id, traffic(tokenizer, weights_step=0))
    wait_for_waits(settings, run_id, 2)
    act(settings, "pause", run_id)
    worker.join(timeout=10)
    assert result["status"] == "paused"
    folder = settings.runs_dir / run_id / "weights"
    row = run_row(settings, run_id)
    assert (row.weights_step, row.weights_path) == (1, str(folder / "step-000001"))
    assert [p.name for p in folder.iterdir()] == ["step-000001"]


def test_a_cancel_ends_the_wait(settings, tiny_model_dir):
    run_id = waiting_run(settings, tiny_model_dir)
    worker, result = execute_in_thread(settings, run_id, "worker-a")
    wait_for_waits(settings, run_id, 1)
    act(settings, "cancel", run_id)
    worker.join(timeout=10)
    assert result["status"] == "cancelled" and run_row(settings, run_id).step == 0


# --- publishing -------------------------------------------------------------------------------


def merged_checkpoint(tiny_model_dir, path: str) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, path).merge_and_unload().state_dict()


def test_a_lora_run_publishes_its_merged_weights_and_keeps_two(settings, tiny_model_dir):
    run_id = submit(
        settings,
        tiny_model_dir,
        model={"lora": {"r": 4}},
        training={"steps": 3, "prompts_per_step": 2, "mini_batches": 1},
        serving={"sync_every_steps": 1},
        checkpoint={"every_steps": 3, "keep_last": None},
    )
    ask_for(settings, run_id)
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    row = run_row(settings, run_id)
    folder = settings.runs_dir / run_id / "weights"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000002", "step-000003"]
    assert (row.weights_step, row.weights_path) == (3, str(folder / "step-000003"))
    assert all(metrics(settings, run_id, step)["time/publish_s"] > 0 for step in (1, 2, 3))

    published = AutoModelForCausalLM.from_pretrained(row.weights_path, dtype=torch.float32)
    with session_scope(settings.resolved_database_url) as session:
        ckpt = session.scalars(select(Checkpoint.path).where(Checkpoint.run_id == run_id)).one()
    expected = merged_checkpoint(tiny_model_dir, ckpt)
    got = published.state_dict()
    assert got.keys() == expected.keys()
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    assert any(not torch.equal(got[n], start[n]) for n in got)  # training moved it
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=1e-6)
    tokenizer = AutoTokenizer.from_pretrained(row.weights_path)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template


def test_published_weights_load_as_they_were_and_a_resume_drops_later_ones(
    settings, tiny_model_dir
):
    """A full model with tied embeddings (its head left out of the file, tied again on load),
    the run's own chat template, and after a resume from step 20 the folder of step 30 goes."""
    from workers.publish import WeightsPublisher

    run_id = submit(settings, tiny_model_dir, model={"chat_template": "{{ messages }}"})
    recorder = RunRecorder(settings, run_id, "worker-a")
    spec = RunSpec.model_validate(run_row(settings, run_id).spec)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    own = tokenizer.chat_template
    publisher = WeightsPublisher(settings, recorder, spec, lead=True)
    for step in (10, 20, 30):
        publisher.publish(step, model, tokenizer, gather=False)
    folder = settings.runs_dir / run_id / "weights"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000020", "step-000030"]
    publisher.publish(20, model, tokenizer, gather=False)  # resumed from the checkpoint of 20
    assert sorted(p.name for p in folder.iterdir()) == ["step-000020"]
    row = run_row(settings, run_id)
    assert (row.weights_step, row.weights_path) == (20, str(folder / "step-000020"))

    loaded = AutoModelForCausalLM.from_pretrained(row.weights_path)  # its config's dtype
    assert loaded.dtype == torch.bfloat16
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    got, want = loaded.state_dict(), model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[name], want[name]) for name in want)
    assert AutoTokenizer.from_pretrained(row.weights_path).chat_template == "{{ messages }}"
    assert tokenizer.chat_template == own  # the run's tokenizer is left as it was
