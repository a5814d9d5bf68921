"""Data parallel: 2 gloo processes, each with half of the groups, make the same update as one
process with all of them (group counts and gradients are summed across ranks), whether each
holds the whole model (ddp) or a shard of it (fsdp)."""

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.contract.spec import RunSpec
from workers.learner.learner import GroupBatch, Learner, LearnerConfig
from workers.learner.sharding import full

pytestmark = pytest.mark.slow

PROMPTS = ["abc=", "hello=", "12+7=", "q="]
COMPLETIONS = [
    ["abc", "xy", "abcd", "q"],
    ["hello", "olleh", "h", "zz"],
    ["19", "1", "7", "20"],
    ["a", "bb", "ccc", "d"],
]
# group 1 has equal rewards: skipped, so rank 0 trains 1 group and rank 1 trains 2
REWARDS = [[1.0, 0.0, 0.5, 0.0], [0.5, 0.5, 0.5, 0.5], [0.2, 0.0, 0.0, 1.0], [0.0, 0.5, 1.0, 0.5]]


def make_learner(
    model_dir: str,
    algorithm: str,
    resources: dict | None = None,
    micro_batch_tokens: int | None = None,
):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    spec = RunSpec.model_validate(
        {
            "model": {"path": model_dir},
            "dataset": {"train_file": "x"},
            "reward": {"type": "builtin", "name": "char_accuracy"},
            # groups with equal rewards skipped: each rank must count the ones it leaves out
            "algorithm": {
                "name": algorithm,
                "reference": "initial",
                "beta": 0.1,
                "skip_zero_variance": True,
            },
            "optimizer": {"lr": 1e-3, "grad_clip": None},
            "training": {"mini_batches": 1, "micro_batch_tokens": micro_batch_tokens},
            "resources": resources or {},
        }
    )
    return Learner(model, LearnerConfig.of(spec), torch.device("cpu"), 0), tokenizer


def make_batch(tokenizer, groups: list[int]) -> GroupBatch:
    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return GroupBatch(
        [enc(PROMPTS[g]) for g in groups],
        [[enc(c) + [2] for c in COMPLETIONS[g]] for g in groups],
        torch.tensor([REWARDS[g] for g in groups]),
    )


def train(learner: Learner, tokenizer, groups: list[int], steps: int = 2) -> dict:
    for step in range(1, steps + 1):
        stats = learner.learn(make_batch(tokenizer, groups), step)
    model = learner.model  # a sharded model's tensors are gathered whole
    return {
        "params": {n: full(p.detach()).clone() for n, p in model.named_parameters()},
        "grads": {n: full(p.grad).clone() for n, p in model.named_parameters()},
        "loss": stats.loss,
        "kl": stats.kl_ref,
        "zv": stats.zero_variance_frac,
        "groups": stats.groups_trained,
    }


def _rank(
    rank: int,
    world: int,
    model_dir: str,
    algorithm: str,
    strategy: str,
    micro: int | None,
    out: str,
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # The ranks meet through a file (no port to pick; gloo's own connections take ports the
    # system assigns). A rank left waiting in a collective (mismatched passes) fails the test
    # instead of hanging it.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out}/rendezvous",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        learner, tokenizer = make_learner(
            model_dir, algorithm, {"processes": world, "strategy": strategy}, micro
        )
        torch.save(train(learner, tokenizer, [[0, 1], [2, 3]][rank]), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# micro_batch_tokens=1: one group per pass, so rank 0 makes 1 pass and rank 1 makes 2; under
# FSDP rank 0 adds a filler pass (every pass gathers the shards) that must change nothing.
@pytest.mark.parametrize(
    ("strategy", "micro"),
    [("ddp", None), ("fsdp", None), ("fsdp", 1)],
    ids=["ddp", "fsdp", "fsdp-filler"],
)
@pytest.mark.parametrize("algorithm", ["gvpo", "grpo"])
def test_two_gloo_ranks_match_one_process(tiny_model_dir, tmp_path, algorithm, strategy, micro):
    mp.spawn(
        _rank,
        args=(2, str(tiny_model_dir), algorithm, strategy, micro, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    learner, tokenizer = make_learner(str(tiny_model_dir), algorithm, micro_batch_tokens=micro)
    single = train(learner, tokenizer, [0, 1, 2, 3])
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for name, grad in single["grads"].items():
        for result in ranks:
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(result["params"][name], ranks[0]["params"][name])
            clear = grad.abs() > 1e-5  # AdamW steps ~lr*sign(grad): compare where it is defined
            torch.testing.assert_close(
                result["params"][name][clear], single["params"][name][clear], rtol=1e-4, atol=1e-5
            )
    for result in ranks:
        assert result["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert result["kl"] == pytest.approx(single["kl"], rel=1e-4)
        assert (result["zv"], result["groups"]) == (single["zv"], single["groups"]) == (0.25, 3)
