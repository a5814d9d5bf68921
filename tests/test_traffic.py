"""Groups of served completions (traffic) train exactly: each sampled id is scored given the
prompt it was sampled with, whether an episode's turns extend one another (one masked
sequence) or not (segments, each given its own prompt), and whatever each episode's first
prompt. The segment path changes nothing for the completions that exist today."""

import copy
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.contract.groups import (
    fit_problem,
    group_problem,
    group_size,
    is_chat_group,
    traffic_problem,
)
from service.contract.spec import RunSpec
from workers.chat import Renderer
from workers.learner.learner import GroupBatch, Learner, LearnerConfig
from workers.learner.losses import gvpo_loss
from workers.offpolicy import as_rollout, load_groups, sampled_by_run
from workers.rollout.base import Rollout, Segment
from workers.step_metrics import step_record
from workers.traffic import episode_segments, staleness, traffic_rollout

from factories import DROP, run_spec

CPU = torch.device("cpu")
PAD, EOS = 0, 2
BETA = 0.5


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def ids(tokenizer, text: str, eos: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [EOS] * eos


def turn(prompt: list[int], sampled: list[int], step: int | None = 0) -> dict:
    return {
        "completion_id": "cmpl_x",
        "prompt_ids": prompt,
        "token_ids": sampled,
        "weights_step": step,
    }


def traffic_group(tokenizer) -> dict:
    """Three episodes: (a) two turns, the second's prompt extending the first's context;
    (b) two turns, the second re-rendered (the first reply without its EOS, so its ids do not
    extend the first turn's); (c) one turn from a prompt of its own (a system line first)."""
    t = lambda text, eos=False: ids(tokenizer, text, eos)  # noqa: E731
    first = t("u:hi\na:")
    a1, a2 = t("yo", eos=True), t("ok", eos=True)
    extended = first + a1 + t("\nt:42\na:")
    rerendered = t("u:hi\na:yo\nt:42\na:")
    return {
        "traffic": [
            {"turns": [turn(first, a1, 3), turn(extended, a2, 4)], "reward": 1.0},
            {"turns": [turn(first, t("no", True), 2), turn(rerendered, a2, 4)], "reward": 0.0},
            {"turns": [turn(t("s:be brief\nu:hi\na:"), t("hey", True), None)], "reward": 0.25},
        ],
        "source": "agent",
    }


def make_learner(model, model_dir, **training) -> Learner:
    spec = RunSpec.model_validate(
        run_spec(
            model_dir,
            "f",
            {"algorithm": DROP, "training": DROP},
            algorithm={"beta": BETA, "reference": "initial", "group_size": 3},
            training={"mini_batches": 1, "prompts_per_step": 2, **training},
            optimizer={"lr": 1e-3, "grad_clip": None},
        )
    )
    return Learner(model, LearnerConfig.of(spec), CPU, PAD)


def batch_of(rollouts: list[Rollout], rewards: list[list[float]]) -> GroupBatch:
    """The learner's batch, as the run loop builds it from rollouts."""
    completions = [c for r in rollouts for c in r.completions]
    masked = any(c.mask is not None for c in completions)
    segmented = any(c.segments is not None for c in completions)
    return GroupBatch(
        [r.prompt_ids for r in rollouts],
        [[c.token_ids for c in r.completions] for r in rollouts],
        torch.tensor(rewards),
        masks=[[c.mask for c in r.completions] for r in rollouts] if masked else None,
        segments=[[c.segments for c in r.completions] for r in rollouts] if segmented else None,
    )


def turn_logp(model, prompt: list[int], sampled: list[int]) -> torch.Tensor:
    """log pi(sampled | prompt), summed, from one unpadded forward pass (with grad)."""
    logits = model(input_ids=torch.tensor([prompt + sampled])).logits[0].float()
    logps = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)  # predicts sampled[j]
    return logps.gather(-1, torch.tensor(sampled).unsqueeze(-1)).sum()


def by_hand(model, episodes: list[dict]) -> torch.Tensor:
    """(k,) each episode's log-prob: every turn's sampled ids given its own prompt."""
    return torch.stack(
        [
            sum(turn_logp(model, t["prompt_ids"], t["token_ids"]) for t in e["turns"])
            for e in episodes
        ]
    )


def perturbed(model_dir):
    """The tiny model, and a copy nudged away from it (so s_i = log pi - log pi_ref is not 0)."""
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    policy = copy.deepcopy(reference)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return policy, reference


# --- the stored form --------------------------------------------------------------------------


def test_a_traffic_group_is_classified_and_checked_as_one(tokenizer):
    row = traffic_group(tokenizer)
    assert not is_chat_group(row) and group_size(row) == 3
    assert traffic_problem(row) is None
    assert fit_problem(row, 3, 1) is None
    assert "exactly algorithm.group_size (4)" in fit_problem(row, 4, 1)
    bad = copy.deepcopy(row)
    bad["traffic"][1]["turns"][0]["token_ids"] = ["a"]
    assert "traffic[1]['turns'][0]" in traffic_problem(bad)
    assert "unknown keys ['traffic']" in group_problem(row)  # never a user's upload


def test_extending_turns_join_and_others_start_a_segment(tokenizer):
    episodes = traffic_group(tokenizer)["traffic"]
    [joined] = episode_segments(episodes[0]["turns"])
    first, second = episodes[0]["turns"]
    between = second["prompt_ids"][len(first["prompt_ids"]) + len(first["token_ids"]) :]
    assert joined.prompt_ids == first["prompt_ids"]
    assert joined.token_ids == first["token_ids"] + between + second["token_ids"]
    assert joined.mask == [1] * 3 + [0] * len(between) + [1] * 3
    apart = episode_segments(episodes[1]["turns"])
    assert [(s.prompt_ids, s.token_ids) for s in apart] == [
        (t["prompt_ids"], t["token_ids"]) for t in episodes[1]["turns"]
    ]
    rollout = traffic_rollout(episodes, tokenizer)
    assert rollout.prompt_ids == first["prompt_ids"]
    a, b, c = rollout.completions
    assert a.segments is None and a.mask == joined.mask  # one sequence after the group's prompt
    assert b.segments == apart and b.token_ids == apart[0].token_ids + apart[1].token_ids
    assert c.segments == [Segment(episodes[2]["turns"][0]["prompt_ids"], c.token_ids, [1] * 4)]
    assert c.mask is None and c.sampled_tokens == 4


def test_a_traffic_group_loads_with_its_rewards_and_decoded_text(tokenizer):
    row = traffic_group(tokenizer)
    [group] = load_groups([row], Renderer(tokenizer, [EOS]))
    assert group.rewards == [1.0, 0.0, 0.25] and group.sources == ["agent"] * 3
    assert sampled_by_run(group, 3) == 0  # nothing topped up
    assert group.example.prompt == "u:hi\na:"
    assert group.completions[0] == "yo</s>\nt:42\na:ok</s>"
    # a re-rendered turn shows what differs from the context before it
    assert group.completions[1] == "no</s>yo\nt:42\na:ok</s>"
    rollout = as_rollout(group, tokenizer, EOS)
    assert rollout == traffic_rollout(row["traffic"], tokenizer)


# --- exactness --------------------------------------------------------------------------------


@torch.no_grad()
def learner_s(learner: Learner, batch: GroupBatch) -> torch.Tensor:
    """(k,) the learner's s_i of group 0: its own sequences, log pi - log pi_ref, masked."""
    from workers.learner.logprobs import sequence_logprobs

    sequences = learner._sequences(batch, [0])
    policy = sequence_logprobs(learner.model, sequences)
    with learner._reference_model() as reference:
        ref = sequence_logprobs(reference, sequences)
    return ((policy.token_logps - ref.token_logps) * policy.mask).sum(dim=-1)


def test_s_i_sums_each_turn_given_its_own_prompt(tokenizer, tiny_model_dir):
    episodes = traffic_group(tokenizer)["traffic"]
    policy, reference = perturbed(tiny_model_dir)
    learner = make_learner(policy, tiny_model_dir)
    learner.frozen = reference.eval().requires_grad_(False)
    batch = batch_of([traffic_rollout(episodes, tokenizer)], [[1.0, 0.0, 0.25]])
    with torch.no_grad():
        expected = by_hand(policy, episodes) - by_hand(reference, episodes)
    got = learner_s(learner, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().min() > 1e-2  # the policy did move away from the reference

    # Scoring the re-rendered turn after the first turn's ids instead (its segments joined as
    # one context) gives another number: the check above can tell.
    first, second = episodes[1]["turns"]
    with torch.no_grad():
        joined = sum(
            turn_logp(m, first["prompt_ids"], first["token_ids"] + second["token_ids"]) * sign
            for m, sign in ((policy, 1), (reference, -1))
        )
    assert abs(float(joined) - float(got[1])) > 1e-2


def test_loss_and_gradients_are_the_hand_computed_ones(tokenizer, tiny_model_dir):
    row = traffic_group(tokenizer)
    episodes, rewards = row["traffic"], [[1.0, 0.0, 0.25]]
    policy, reference = perturbed(tiny_model_dir)
    learner = make_learner(policy, tiny_model_dir)
    learner.frozen = reference.eval().requires_grad_(False)
    learner.optimizer.step = lambda: None  # keep the gradients of the weights they were taken at
    stats = learner.learn(batch_of([traffic_rollout(episodes, tokenizer)], rewards), step=1)
    got = [p.grad.clone() for p in policy.parameters()]

    policy.zero_grad()
    with torch.no_grad():
        ref = by_hand(reference, episodes).view(1, 3)
    loss = gvpo_loss(by_hand(policy, episodes).view(1, 3), ref, torch.tensor(rewards), BETA)
    loss.backward()
    assert stats.loss == pytest.approx(loss.item(), rel=1e-5)
    for a, b in zip(got, [p.grad for p in policy.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --- the fast path ----------------------------------------------------------------------------


def ordinary_batch(tokenizer) -> GroupBatch:
    """Two groups of 3 completions after their group's prompt, one group masked (an episode)."""
    t = lambda text: ids(tokenizer, text, eos=True)  # noqa: E731
    return GroupBatch(
        [ids(tokenizer, "abc="), ids(tokenizer, "hello=")],
        [[t("abc"), t("xy"), t("abcd")], [t("hello"), t("olleh"), t("h")]],
        torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.25]]),
        masks=[[None, [1, 0, 1], None], [[1, 1, 0, 0, 1, 1], None, None]],
    )


def as_segments(batch: GroupBatch) -> GroupBatch:
    """The same batch with every completion spelt out as one segment after its prompt."""
    return dataclasses.replace(
        batch,
        segments=[
            [batch.pieces(g, i) for i in range(len(batch.completion_ids[g]))]
            for g in range(len(batch.prompt_ids))
        ],
    )


@pytest.mark.parametrize("micro_batch_tokens", [None, 1])
def test_one_segment_per_completion_gives_bit_identical_numbers(
    tokenizer, tiny_model_dir, micro_batch_tokens
):
    batch = ordinary_batch(tokenizer)
    results = []
    for b in (batch, as_segments(batch)):
        torch.manual_seed(0)
        policy, reference = perturbed(tiny_model_dir)
        learner = make_learner(policy, tiny_model_dir, micro_batch_tokens=micro_batch_tokens)
        learner.frozen = reference.eval().requires_grad_(False)
        learner.optimizer.step = lambda: None
        stats = learner.learn(b, step=1)
        results.append((stats, [p.grad.clone() for p in policy.parameters()]))
    (fast, fast_grads), (segmented, segmented_grads) = results
    assert fast == segmented  # every statistic, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(fast_grads, segmented_grads, strict=True))


def test_a_segment_batch_packs_by_its_rows_tokens(tokenizer):
    batch = as_segments(ordinary_batch(tokenizer))
    assert batch.group_tokens(0) == ordinary_batch(tokenizer).group_tokens(0)
    rollout = traffic_rollout(traffic_group(tokenizer)["traffic"], tokenizer)
    traffic = batch_of([rollout], [[0.0, 1.0, 0.0]])
    rows = [s for i in range(3) for s in traffic.pieces(0, i)]
    assert len(rows) == 4  # (a) one sequence, (b) two segments, (c) one of its own
    assert traffic.group_tokens(0) == sum(len(s.prompt_ids) + len(s.token_ids) for s in rows)


# --- staleness --------------------------------------------------------------------------------


def test_staleness_is_the_updates_between_serving_and_training(tokenizer):
    episodes = traffic_group(tokenizer)["traffic"]  # turns served by steps 3, 4, 2, 4, unknown
    assert staleness(5, [episodes]) == {
        "offpolicy/staleness_mean": pytest.approx((1 + 0 + 2 + 0) / 4),
        "offpolicy/staleness_max": 2.0,
    }
    assert staleness(5, []) == {}


def test_a_step_of_traffic_reports_its_staleness_and_samples(tokenizer):
    from workers.learner.learner import LearnStats
    from workers.rewards.base import Scores

    row = traffic_group(tokenizer)
    older = copy.deepcopy(row)
    for episode in older["traffic"]:
        for t in episode["turns"]:
            t["weights_step"] = 0
    groups = load_groups([row, older], Renderer(tokenizer, [EOS]))
    slots = [(g.example, g) for g in groups]
    rollouts = [as_rollout(g, tokenizer, EOS) for g in groups]
    stats = LearnStats(0.1, 1.0, 0.0, 0.0, 0.0, 1.0, 0.5, float("nan"), 0.0, 2, 1)
    rewards = torch.tensor([g.rewards for g in groups])
    record = step_record(7, slots, rollouts, Scores(rewards), stats, 1e-3, {"time/learn_s": 1}, 2)
    # (6-3, 6-4, 6-2, 6-4) and five turns served by step 0: six updates old
    ages = [3, 2, 4, 2] + [6] * 5
    assert record.metrics["offpolicy/staleness_mean"] == pytest.approx(sum(ages) / len(ages))
    assert record.metrics["offpolicy/staleness_max"] == 6.0
    assert record.metrics["source/agent/samples"] == 6.0
    assert record.tokens_generated == 0  # the run sampled none of them
    first = record.samples[0]
    assert (first["prompt"], first["completion"]) == ("u:hi\na:", "yo</s>\nt:42\na:ok</s>")
    assert (first["source"], first["reward"], first["episode"]) == ("agent", 1.0, None)
