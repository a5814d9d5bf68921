"""Tests for the GVPO learner, the log-prob helpers and the HF rollout engine, on the real
offline tiny Llama (CPU, float32, seeded)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.contract.spec import RunSpec, SamplingSpec
from workers.learner.learner import GroupBatch, Learner, LearnerConfig
from workers.learner.logprobs import build_batch, sequence_logprobs
from workers.learner.losses import gvpo_loss, gvpo_weights
from workers.rollout.hf import HFRolloutEngine

from factories import DROP, run_spec, set_constant_logits

CPU = torch.device("cpu")
PAD, EOS = 0, 2
PROMPTS = ["abc=", "hello="]
COMPLETIONS = [["abc", "xy", "abcd", "q"], ["hello", "olleh", "h", "zz"]]  # (G=2, k=4)
REWARDS = [[1.0, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.25]]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


# The learner alone: the spec's own algorithm, sampling and training defaults, lr 1e-3.
LEARNER = {"algorithm": DROP, "sampling": DROP, "training": DROP}


def make_spec(model_dir, **sections) -> RunSpec:
    return RunSpec.model_validate(run_spec(model_dir, "train.jsonl", LEARNER, **sections))


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def make_batch(tokenizer, rewards=REWARDS, prompts=PROMPTS, completions=COMPLETIONS) -> GroupBatch:
    return GroupBatch(
        prompt_ids=[encode(tokenizer, p) for p in prompts],
        completion_ids=[[encode(tokenizer, c) + [EOS] for c in group] for group in completions],
        rewards=torch.tensor(rewards, dtype=torch.float32),
    )


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before: dict, model) -> bool:
    return any(not torch.equal(before[n], p) for n, p in model.named_parameters())


@torch.no_grad()
def group_logps(model, batch: GroupBatch) -> torch.Tensor:
    """Summed completion log-probs, shape (G, k)."""
    G, k = batch.rewards.shape
    prompts = [batch.prompt_ids[g] for g in range(G) for _ in range(k)]
    comps = [c for group in batch.completion_ids for c in group]
    return sequence_logprobs(model, build_batch(prompts, comps, PAD, CPU)).summed.view(G, k)


# --- log-probs ----------------------------------------------------------------------------------


def manual_logp(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    total = torch.tensor(0.0)
    for j, tok in enumerate(completion):
        pos = len(prompt) + j
        total = total + torch.log_softmax(logits[pos - 1], dim=-1)[tok]
    return total


def test_sequence_logprobs_match_manual_and_ignore_padding(model, tokenizer):
    torch.manual_seed(0)
    prompts = [encode(tokenizer, "abc="), encode(tokenizer, "hello world=")]
    comps = [encode(tokenizer, "cbaxyz") + [EOS], encode(tokenizer, "ok") + [EOS]]
    batch = build_batch(prompts, comps, PAD, CPU)
    # left-padded prompts, right-padded completions: every completion starts at column 12
    assert batch.input_ids.shape == (2, 12 + 7) and batch.prompt_width == 12
    assert batch.completion_mask.sum(dim=1).tolist() == [7, 3]
    with torch.no_grad():
        padded = sequence_logprobs(model, batch).summed
    for row, (p, c) in enumerate(zip(prompts, comps, strict=True)):
        torch.testing.assert_close(padded[row], manual_logp(model, p, c), atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            alone = sequence_logprobs(model, build_batch([p], [c], PAD, CPU)).summed[0]
        torch.testing.assert_close(padded[row], alone, atol=1e-5, rtol=0)


# --- learner ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mini_batches", [1, 4])
def test_learn_changes_parameters(model, tokenizer, tiny_model_dir, mini_batches):
    torch.manual_seed(0)
    spec = make_spec(tiny_model_dir, training={"mini_batches": mini_batches})
    learner = Learner(model, LearnerConfig.of(spec), CPU, PAD)
    before = snapshot(model)
    stats = learner.learn(make_batch(tokenizer), step=1)
    assert changed(before, model)
    assert torch.isfinite(torch.tensor([stats.loss, stats.grad_norm])).all()
    assert stats.grad_norm > 0
    assert stats.updates == min(mini_batches, 2)
    assert stats.groups_trained == 2 and stats.zero_variance_frac == 0.0


def test_zero_variance_groups_are_skipped(model, tokenizer, tiny_model_dir):
    torch.manual_seed(0)
    spec = make_spec(tiny_model_dir, algorithm={"skip_zero_variance": True})
    learner = Learner(model, LearnerConfig.of(spec), CPU, PAD)
    before = snapshot(model)
    stats = learner.learn(make_batch(tokenizer, rewards=[[1.0] * 4, [0.3] * 4]), step=1)
    assert not changed(before, model)
    assert stats.groups_trained == 0 and stats.updates == 0
    assert stats.zero_variance_frac == 1.0

    stats = learner.learn(make_batch(tokenizer, rewards=[[1.0] * 4, [0.0, 1.0, 0.0, 0.0]]), step=2)
    assert changed(before, model)
    assert stats.zero_variance_frac == 0.5 and stats.groups_trained == 1 and stats.updates == 1


def test_zero_variance_groups_train_when_not_skipped(model, tokenizer, tiny_model_dir):
    torch.manual_seed(0)
    spec = make_spec(tiny_model_dir, algorithm={"skip_zero_variance": False})
    learner = Learner(model, LearnerConfig.of(spec), CPU, PAD)
    stats = learner.learn(make_batch(tokenizer, rewards=[[1.0] * 4, [0.0, 1.0, 0.0, 0.0]]), step=1)
    assert stats.zero_variance_frac == 0.5
    assert stats.groups_trained == 2 and stats.updates == 2


@pytest.mark.parametrize("reference", ["initial", "sampling"])
def test_rewarded_completion_gains_probability(model, tokenizer, tiny_model_dir, reference):
    torch.manual_seed(0)
    spec = make_spec(
        tiny_model_dir, algorithm={"reference": reference}, training={"mini_batches": 1}
    )
    learner = Learner(model, LearnerConfig.of(spec), CPU, PAD)
    batch = make_batch(tokenizer, rewards=[[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    winners = torch.tensor([0, 2])

    def margin() -> torch.Tensor:  # log pi(winner) - mean log pi(others), per group
        lp = group_logps(model, batch)
        win = lp[torch.arange(2), winners]
        return win - (lp.sum(dim=1) - win) / 3

    start = margin()
    for step in range(1, 6):
        learner.learn(batch, step)
    gain = margin() - start
    assert (gain > 1.0).all(), gain


@pytest.mark.parametrize("algorithm", ["gvpo", "grpo", "dr_grpo"])
def test_micro_batching_gives_the_same_update(model, tokenizer, tiny_model_dir, algorithm):
    """One pass over 4 groups and 4 passes of one group each (a 1-token budget) make the same
    gradients and the same parameter update."""
    torch.manual_seed(0)
    twin = copy.deepcopy(model)
    batch = make_batch(
        tokenizer,
        rewards=REWARDS + [[0.2, 0.0, 0.0, 1.0], [0.0, 0.5, 1.0, 0.5]],
        prompts=PROMPTS + ["12+7=", "q="],
        completions=COMPLETIONS + [["19", "1", "7", "20"], ["a", "bb", "ccc", "d"]],
    )
    learners = []
    for m, budget in ((model, 1), (twin, None)):
        spec = make_spec(
            tiny_model_dir,
            algorithm={"name": algorithm, "reference": "initial"},
            training={"mini_batches": 1, "micro_batch_tokens": budget},
            optimizer={"grad_clip": None},
        )
        learners.append(Learner(m, LearnerConfig.of(spec), CPU, PAD))
    assert len(learners[0].micro_batches(batch, [0, 1, 2, 3])) == 4
    assert len(learners[1].micro_batches(batch, [0, 1, 2, 3])) == 1
    stats = [learner.learn(batch, step=1) for learner in learners]
    assert stats[0].loss == pytest.approx(stats[1].loss, rel=1e-4, abs=1e-7)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        # AdamW's first step is ~lr*sign(grad): compare where the sign is well defined.
        clear = q.grad.abs() > 1e-5
        torch.testing.assert_close(p[clear], q[clear], rtol=1e-5, atol=1e-6, msg=name)


def test_token_budget_packs_whole_groups(model, tokenizer, tiny_model_dir):
    spec = make_spec(tiny_model_dir, training={"micro_batch_tokens": 60})
    batch = make_batch(tokenizer)  # group 0: 4*4 + 14 = 30 tokens, group 1: 4*6 + 17 = 41
    assert [batch.group_tokens(g) for g in (0, 1)] == [30, 41]
    assert Learner(model, LearnerConfig.of(spec), CPU, PAD).micro_batches(batch, [0, 1, 0]) == [
        [0],
        [1],
        [0],
    ]
    spec = make_spec(tiny_model_dir, training={"micro_batch_tokens": 72})
    assert Learner(model, LearnerConfig.of(spec), CPU, PAD).micro_batches(batch, [0, 1, 0]) == [
        [0, 1],
        [0],
    ]


def test_sampling_reference_is_the_pre_update_policy(model, tokenizer, tiny_model_dir):
    torch.manual_seed(0)
    spec = make_spec(
        tiny_model_dir, algorithm={"reference": "sampling"}, training={"mini_batches": 1}
    )
    stats = Learner(model, LearnerConfig.of(spec), CPU, PAD).learn(make_batch(tokenizer), step=1)
    assert abs(stats.logratio_mean) < 1e-5
    assert abs(stats.kl_ref) < 1e-5


def test_sampling_reference_holds_across_the_steps_mini_batches(model, tokenizer, tiny_model_dir):
    """The second mini-batch is scored against the policy that sampled the step, not against
    the policy after the first update: its KL term is non-zero."""
    torch.manual_seed(0)
    spec = make_spec(
        tiny_model_dir, algorithm={"reference": "sampling"}, training={"mini_batches": 2}
    )
    stats = Learner(model, LearnerConfig.of(spec), CPU, PAD).learn(make_batch(tokenizer), step=1)
    assert stats.updates == 2
    assert stats.kl_ref > 1e-6 and abs(stats.logratio_mean) > 1e-5


def test_initial_reference_accumulates_kl(model, tokenizer, tiny_model_dir):
    torch.manual_seed(0)
    spec = make_spec(
        tiny_model_dir, algorithm={"reference": "initial"}, training={"mini_batches": 1}
    )
    learner = Learner(model, LearnerConfig.of(spec), CPU, PAD)
    first = learner.learn(make_batch(tokenizer), step=1)
    assert abs(first.kl_ref) < 1e-5  # the frozen copy equals the policy before the first update
    for step in range(2, 5):
        stats = learner.learn(make_batch(tokenizer), step)
    assert stats.kl_ref > 1e-6
    assert abs(stats.logratio_mean) > 1e-4


def test_warmup_ramps_linearly_then_holds(model, tiny_model_dir, tokenizer):
    spec = make_spec(tiny_model_dir, optimizer={"lr": 1e-3, "warmup_steps": 4})
    learner = Learner(model, LearnerConfig.of(spec), CPU, PAD)
    lrs = [learner.lr_at(step) for step in range(1, 9)]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])
    torch.manual_seed(0)
    learner.learn(make_batch(tokenizer), step=2)
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    no_warmup = Learner(
        model, LearnerConfig.of(make_spec(tiny_model_dir, optimizer={"lr": 1e-3})), CPU, PAD
    )
    assert no_warmup.lr_at(1) == pytest.approx(1e-3)


# --- the GVPO gradient identity on the real model -----------------------------------------------


def test_loss_gradient_is_weighted_sum_of_logprob_gradients(model, tokenizer):
    torch.manual_seed(0)
    beta, k = 0.5, 4
    params = [p for p in model.parameters() if p.requires_grad]
    prompt = encode(tokenizer, "abc=")
    comps = [encode(tokenizer, c) + [EOS] for c in COMPLETIONS[0]]
    batch = build_batch([prompt] * k, comps, PAD, CPU)
    policy = sequence_logprobs(model, batch).summed.view(1, k)
    reference = policy.detach() + torch.randn(1, k)  # non-trivial s - s̄
    rewards = torch.tensor([REWARDS[0]])
    loss_grads = torch.autograd.grad(gvpo_loss(policy, reference, rewards, beta), params)

    w = gvpo_weights(policy, reference, rewards, beta)[0]
    assert w.abs().sum() > 0
    expected = [torch.zeros_like(p) for p in params]
    for i, comp in enumerate(comps):
        logp_i = sequence_logprobs(model, build_batch([prompt], [comp], PAD, CPU)).summed[0]
        for acc, g in zip(expected, torch.autograd.grad(logp_i, params), strict=True):
            acc -= beta / (1 * (k - 1)) * w[i] * g
    for got, want in zip(loss_grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# --- HF rollout engine --------------------------------------------------------------------------


def bias_logits(model, boosts: dict[int, float]):
    """Give lm_head a bias so the random model emits the boosted tokens often."""
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        for tok, value in boosts.items():
            biased.bias[tok] = value
    model.lm_head = biased
    return model


def visible_text(tokenizer, ids: list[int]) -> str:
    """What the reward must see: every sampled token but the terminating EOS."""
    return tokenizer.decode(ids[:-1] if ids and ids[-1] == EOS else ids, skip_special_tokens=False)


def test_hf_engine_does_not_hide_special_tokens_from_rewards(model, tokenizer):
    torch.manual_seed(0)
    bias_logits(model, {tokenizer.bos_token_id: 4.0})
    engine = HFRolloutEngine(model, tokenizer, CPU)
    texts = [
        c.text
        for r in engine.generate(PROMPTS, n=4, sampling=SamplingSpec(max_new_tokens=4))
        for c in r.completions
    ]
    # A policy that emits <s> must not get credit for text that decodes to nothing.
    assert any("<s>" in t for t in texts), texts


def test_hf_engine_generate(model, tokenizer):
    torch.manual_seed(0)
    bias_logits(model, {EOS: 3.0})
    engine = HFRolloutEngine(model, tokenizer, CPU)
    rollouts = engine.generate(PROMPTS, n=3, sampling=SamplingSpec(max_new_tokens=5))
    assert len(rollouts) == 2
    reasons = set()
    for prompt, rollout in zip(PROMPTS, rollouts, strict=True):
        assert rollout.prompt_ids == encode(tokenizer, prompt)
        assert len(rollout.completions) == 3
        for c in rollout.completions:
            assert 1 <= len(c.token_ids) <= 5
            assert (c.finish_reason == "stop") == (c.token_ids[-1] == EOS)
            assert EOS not in c.token_ids[:-1]
            assert c.text == visible_text(tokenizer, c.token_ids)
            reasons.add(c.finish_reason)
    assert reasons == {"stop", "length"}  # the seeded run exercises both branches


def test_hf_engine_stop_string_truncates(model, tokenizer):
    torch.manual_seed(0)
    x = encode(tokenizer, "x")[0]
    bias_logits(model, {EOS: 3.0, x: 3.0})
    engine = HFRolloutEngine(model, tokenizer, CPU)
    sampling = SamplingSpec(max_new_tokens=5, stop=["x"])
    hits = 0
    for rollout in engine.generate(PROMPTS, n=3, sampling=sampling):
        for c in rollout.completions:
            full = visible_text(tokenizer, c.token_ids)
            assert "x" not in c.text
            if "x" in full:
                hits += 1
                assert c.text == full[: full.index("x")]
                assert c.finish_reason == "stop"
                # Only sampled tokens: nothing (e.g. padding) after the one that completed the stop.
                assert "x" not in tokenizer.decode(c.token_ids[:-1]), c.token_ids
            else:
                assert c.text == full
    assert hits > 0


def test_lora_initial_reference_is_the_base_model_without_a_copy(model, tokenizer, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = copy.deepcopy(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    spec = make_spec(
        tiny_model_dir,
        model={"lora": {"r": 4}},
        algorithm={"reference": "initial"},
        optimizer={"lr": 1e-2},
    )
    learner = Learner(peft_model, LearnerConfig.of(spec), CPU, PAD)
    assert learner.frozen is None  # no second copy of the weights
    batch = make_batch(tokenizer)
    for step in range(1, 4):
        stats = learner.learn(batch, step)
    assert stats.kl_ref > 0  # the adapter moved away from the base model
    plan = [[0, 1]]
    with learner._reference_model() as reference:
        ref = learner._token_logps(batch, plan, reference)[0]
    expected = learner._token_logps(batch, plan, base)[0]
    torch.testing.assert_close(ref, expected)


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, tiny_model_dir):
    from workers.model_loading import load_policy

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        spec = make_spec(
            tiny_model_dir,
            training={"gradient_checkpointing": checkpointing, "mini_batches": 1},
            optimizer={"grad_clip": None},
        )
        policy, _ = load_policy(spec, CPU)
        assert policy.is_gradient_checkpointing == checkpointing
        Learner(policy, LearnerConfig.of(spec), CPU, PAD).learn(make_batch(tokenizer), step=1)
        grads.append([p.grad.clone() for p in policy.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, recomputed, rtol=1e-5, atol=1e-7)


def test_hf_engine_samples_from_the_whole_distribution(model, tokenizer):
    """No hidden top-k (transformers applies top_k=50 unless told otherwise): with near-flat
    logits over 100 tokens (EOS ruled out), the samples use far more than 50 distinct tokens."""
    logits = torch.linspace(0, 0.5, model.config.vocab_size)
    logits[EOS] = -30.0
    set_constant_logits(model, logits)
    engine = HFRolloutEngine(model, tokenizer, CPU)
    rollouts = engine.generate(["abc"], 128, SamplingSpec(max_new_tokens=8))
    assert len({t for c in rollouts[0].completions for t in c.token_ids}) >= 90


def test_the_default_reference_is_the_start_or_the_sampler_for_an_adapter_to_go_on(tiny_model_dir):
    assert make_spec(tiny_model_dir).algorithm.reference == "initial"
    # the base model without the adapter is not where such a run starts: sample-time reference
    adapter = {"adapter": str(tiny_model_dir), "lora": {}}
    assert make_spec(tiny_model_dir, model=adapter).algorithm.reference == "sampling"
    with pytest.raises(ValueError, match="reference 'initial' with a LoRA adapter"):
        make_spec(tiny_model_dir, model=adapter, algorithm={"reference": "initial"})


@pytest.mark.parametrize(
    ("algorithm", "given"),
    [
        ({"name": "gvpo", "reference": "initial"}, "reference"),
        ({"name": "gvpo", "reference": "sampling"}, "sampling_weights"),
        ({"name": "gvpo", "reference": "sampling"}, "behaviour"),
        ({"name": "grpo", "reference": "initial"}, "sampling_weights"),
    ],
)
def test_log_probs_given_with_the_batch_make_the_same_steps(
    model, tokenizer, tiny_model_dir, algorithm, given
):
    """An async run's batch brings pi_ref's log-probs (computed on the rollout thread) or the
    sampling policy's (computed from the snapshot that sampled it, or given as computed at a
    checkpoint): where those are the weights the learner would have used itself, two steps of
    two mini-batches are the same as without them; where they are other weights' (here:
    nudged), the steps differ, so the learner does use them."""
    twins = [copy.deepcopy(model) for _ in range(2)]
    spec = make_spec(
        tiny_model_dir, algorithm=algorithm, training={"mini_batches": 2}, optimizer={"lr": 1e-2}
    )
    plain, fed, nudged = (Learner(m, LearnerConfig.of(spec), CPU, PAD) for m in (model, *twins))

    def feed(learner: Learner, shift: float) -> GroupBatch:
        batch = make_batch(tokenizer)
        weights = {n: p + shift for n, p in snapshot(learner.model).items()}
        if given == "reference":
            batch.reference_logps = learner.reference_logps(batch)
            if shift:
                batch.reference_logps = learner.behaviour_logps(weights, batch)
        elif given == "sampling_weights":
            batch.sampling_weights = weights
        else:
            batch.behaviour_logps = learner.behaviour_logps(weights, batch)
        return batch

    for step in (1, 2):
        a = plain.learn(make_batch(tokenizer), step)
        b = fed.learn(feed(fed, 0.0), step)
        nudged.learn(feed(nudged, 0.05), step)
        assert a.loss == pytest.approx(b.loss, rel=1e-5, abs=1e-7)
    for (name, p), q in zip(model.named_parameters(), twins[0].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert changed(snapshot(model), twins[1])
