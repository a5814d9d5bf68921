"""bench/tasks.py and bench/warmstart.py: the warm-started tasks issue 19's algorithm study
starts from (seeded generators, disjoint held-out sets, the service's own reward, a cache)."""

import json
import math
import os

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench import warmstart as ws
from bench.tasks import REWARD, TASKS, get_task
from service.contract.rewards import BUILTIN_REWARDS as REWARD_PARAMS
from workers.rewards.builtin import get_reward


def _score(completion: str, answer: str) -> float:
    return get_reward(REWARD).fn(completion, answer, REWARD_PARAMS[REWARD]())


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generators_are_seeded_and_eval_is_held_out(name):
    task = get_task(name)
    train, held_out = task.split(0)
    assert (train, held_out) == task.split(0)
    assert task.split(1)[1] != held_out
    assert len(train) == task.params.train_rows and len(held_out) == task.params.eval_rows
    train_prompts = {r["prompt"] for r in train}
    assert len(train_prompts) == len(train)
    assert not train_prompts & {r["prompt"] for r in held_out}
    # Room for the longest answer and its EOS within the task's completion budget.
    assert max(len(r["answer"]) for r in train + held_out) < task.max_new_tokens


def test_arithmetic_answers_are_right_and_scored_by_exact_match():
    train, _ = get_task("arithmetic").split(0)
    ops = set()
    for row in train[:500]:
        expr = row["prompt"].removesuffix("=")
        ops.add("+" if "+" in expr else "-")
        assert int(row["answer"]) == eval(expr)  # noqa: S307 - digits and one operator
        assert int(row["answer"]) >= 0
    assert ops == {"+", "-"}
    row = train[0]
    assert _score(row["answer"], row["answer"]) == 1.0
    # The service drops only the EOS; trailing whitespace is forgiven, anything else is wrong.
    assert _score(row["answer"] + "\n", row["answer"]) == 1.0
    assert _score(str(int(row["answer"]) + 1), row["answer"]) == 0.0
    assert _score(row["answer"] + "0", row["answer"]) == 0.0


def test_reverse_answers_are_right_and_scored_by_exact_match():
    train, _ = get_task("reverse").split(0)
    for row in train[:200]:
        assert row["prompt"] == row["answer"][::-1] + ">"
    row = next(r for r in train if r["answer"] != r["answer"][::-1])
    assert _score(row["answer"], row["answer"]) == 1.0
    assert _score(row["answer"][::-1], row["answer"]) == 0.0


def test_unknown_task_or_parameter_is_refused():
    with pytest.raises(ValueError, match="unknown task"):
        get_task("chess")
    with pytest.raises(TypeError):
        get_task("arithmetic", digits=4)


def test_pass_at_k_on_known_counts():
    # n = 4 samples per prompt; 0, 1 and 4 of them right.
    counts, n = [0, 1, 4], 4
    assert ws.mean_pass_at_k(counts, n, 1) == pytest.approx((0 + 0.25 + 1) / 3)
    # One right of 4, 2 drawn: 1 - C(3,2)/C(4,2) = 1/2.
    assert ws.mean_pass_at_k(counts, n, 2) == pytest.approx((0 + 0.5 + 1) / 3)
    assert ws.mean_pass_at_k([2], 5, 3) == pytest.approx(1 - math.comb(3, 3) / math.comb(5, 3))
    assert ws.mean_pass_at_k(counts, n, 4) == pytest.approx(2 / 3)


def test_warmstart_writes_a_loadable_model_and_caches_it(tmp_path, monkeypatch):
    sft = ws.SFTConfig(
        max_steps=3, check_every=2, batch_size=8, check_prompts=4, check_samples=2, final_samples=2
    )
    small = dict(train_rows=40, eval_rows=6)
    folder = ws.warmstart("arithmetic", 0, "test", tmp_path, sft, **small)
    record = json.loads((folder / "warmstart.json").read_text())
    assert record["task"] == "arithmetic" and record["seed"] == 0 and record["size"] == "test"
    assert record["steps"] == 3 and record["stopped"] in {"step_cap", "target"}
    assert 0.0 <= record["eval"]["greedy_pass@1"] <= 1.0
    assert record["eval"]["pass@1"] <= record["eval"]["pass@2"] <= 1.0
    assert record["sft"]["band"] == [0.1, 0.4]
    rows = [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines()]
    assert rows == get_task("arithmetic", **small).split(0)[1]
    assert len((folder / "train.jsonl").read_text().splitlines()) == 40

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.hidden_size == ws.SIZES["test"]["hidden_size"]
    assert tokenizer.decode(tokenizer("12+34=")["input_ids"]) == "12+34="
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no leftover temporary folder

    def no_training(*args, **kwargs):
        raise AssertionError("a cached warm start was trained again")

    monkeypatch.setattr(ws, "train", no_training)
    before = os.stat(folder / "warmstart.json").st_mtime_ns
    assert ws.warmstart("arithmetic", 0, "test", tmp_path, sft, **small) == folder
    assert os.stat(folder / "warmstart.json").st_mtime_ns == before
    # Another seed or generator parameter is another model.
    other = ws.cache_key(get_task("arithmetic", **small), 1, "test", sft)
    assert other not in folder.name


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown size"):
        ws.warmstart("arithmetic", 0, "huge", tmp_path)
