"""Off-policy groups of chat episodes (service/contract/groups.py): checked at upload and when
posted, tokenised by the chat template with only the assistant messages trained, trained in a
run next to the run's own episodes, and scored by the loss dry-run."""

import math

import pytest
import torch
from run_control import run_row
from sqlalchemy import select
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.config import Settings
from service.contract.storage import CheckpointKind
from service.contract.tasks import DryRunOutput, DryRunTask
from service.db import session_scope
from service.models import Run, Sample
from workers.chat import ChatTemplateError, Renderer
from workers.data import Example
from workers.dry_run import answer_dry_run
from workers.environments.builtin import secret_code_rows
from workers.execute import execute_run
from workers.offpolicy import as_rollout, load_groups
from workers.tiny_model import EOS, build_tokenizer, make_tiny_model

from factories import DROP, assert_error, auth, post_file, submit

PROMPT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "code?"}]
CALL = {"id": "c1", "type": "function", "function": {"name": "look", "arguments": "{}"}}


def episode(first: str = "?", code: str = "abc", last: str = "abc") -> list[dict]:
    """A guess, the code revealed (as a tool result, then a user's word), a second guess."""
    return [
        {"role": "assistant", "content": first, "tool_calls": [CALL]},
        {"role": "tool", "content": code, "tool_call_id": "c1"},
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": last},
    ]


def chat_group(**changes) -> dict:
    return {
        "messages": PROMPT,
        "episodes": [episode(last=w) for w in ("abc", "abd", "xyz", "a")],
        "rewards": [1.0, 0.67, 0.0, 0.33],
        "source": "teacher",
        "answer": "abc",
        **changes,
    }


# ---------------------------------------------------------------- the format


def test_an_upload_of_chat_groups_is_accepted(api, make_key):
    single_turn = chat_group(
        episodes=[[{"role": "assistant", "content": w}] for w in ("abc", "xyz")],
        rewards=None,
        difficulty="easy",  # a chat group's other fields go to the reward as its item
    )
    single_turn.pop("rewards")
    resp = post_file(api, make_key(), [chat_group(), single_turn], purpose="offpolicy")
    assert resp.status_code == 201, resp.text
    assert resp.json()["rows"] == 2


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"episodes": []}, "'episodes' must be a list of at least 1 episode"),
        ({"episodes": [episode(), "abc"]}, "episodes[1] must be a non-empty list of messages"),
        ({"episodes": [episode()[1:]]}, "episodes[0] must start with an assistant message"),
        ({"episodes": [episode()[:3]]}, "episodes[0] must end with an assistant message"),
        (
            {"episodes": [[*episode()[:2], {"role": "system", "content": "x"}, episode()[3]]]},
            "episodes[0][2] 'role' must be one of assistant, tool, user",
        ),
        (
            {"episodes": [[{"role": "assistant", "tool_calls": [{"name": "look"}]}]]},
            'episodes[0][0] tool_calls[0] must be {"function"',
        ),
        ({"rewards": [1.0, 0.5]}, "'rewards' must be 4 finite numbers, one per episode"),
        ({"source": ["a", "b"]}, "'source' must be one label or 4, one per episode"),
        ({"prompt": "code?"}, "a group is either text"),
        ({"reward": 1.0}, "a group's rewards are 'rewards'"),
        ({"messages": DROP}, "has 'episodes' but no 'messages'"),
    ],
    ids=[
        "no_episode",
        "episode_not_a_list",
        "starts_with_a_tool",
        "ends_with_a_user",
        "system_in_an_episode",
        "bad_tool_call",
        "reward_count",
        "source_count",
        "mixed_forms",
        "reward_typo",
        "no_prompt",
    ],
)
def test_an_upload_of_bad_chat_groups_names_the_line_and_problem(api, make_key, change, needle):
    row = {key: value for key, value in chat_group(**change).items() if value is not DROP}
    resp = post_file(api, make_key(), [chat_group(), row], purpose="offpolicy", filename="g.jsonl")
    assert_error(resp, 400, "bad_request", "line 2 is not an off-policy group", needle)


def test_a_bad_prompt_message_names_the_line(api, make_key):
    row = chat_group(messages=[{"role": "user"}])
    resp = post_file(api, make_key(), [row], purpose="offpolicy", filename="g.jsonl")
    assert_error(resp, 400, "bad_request", "line 1", "messages[0] needs 'content'")


@pytest.mark.both_backends
def test_chat_groups_posted_to_a_run_are_checked_like_the_files(
    api, settings, make_key, tiny_model_dir
):
    key = make_key("loop")  # submit() creates its runs in project "loop"
    run_id = submit(
        settings, tiny_model_dir, training={"offpolicy_fraction": 0.5, "prompts_per_step": 2}
    )
    url = f"/v1/runs/{run_id}/groups"
    resp = api.post(url, headers=auth(key), json={"groups": [chat_group()]})
    assert resp.status_code == 202, resp.text
    too_many = chat_group(episodes=[episode()] * 5, rewards=[0.0] * 5)
    too_long = chat_group(episodes=[episode(last="x" * 300)] + [episode()] * 3)  # context 256
    error = assert_error(
        api.post(url, headers=auth(key), json={"groups": [chat_group(), too_many, too_long]}),
        422,
        "invalid_request",
        "groups.1",
        "has 5 episodes; algorithm.group_size is 4",
    )
    assert [f["field"] for f in error["details"]["fields"]] == ["groups.1"]
    error = assert_error(
        api.post(url, headers=auth(key), json={"groups": [too_long]}), 422, "invalid_request"
    )
    assert [f["field"] for f in error["details"]["fields"]] == ["groups.0"]
    assert "more than" in error["details"]["fields"][0]["message"]


# ---------------------------------------------------------------- tokenisation


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    tokenizer = build_tokenizer()
    return Renderer(tokenizer, [tokenizer.eos_token_id])


def test_only_the_assistant_messages_and_their_end_of_turn_train(renderer):
    ids = renderer.episode(PROMPT, episode(first="?", code="abc", last="abd"))
    tokens = renderer.tokenizer.convert_ids_to_tokens(ids.token_ids)
    trained = "".join(t for t, m in zip(tokens, ids.mask, strict=True) if m)
    context = "".join(t for t, m in zip(tokens, ids.mask, strict=True) if not m)
    call = '<tool_call>{"name": "look", "arguments": {}}</tool_call>'
    assert trained == f"?{call}{EOS}abd{EOS}"  # the policy's tokens: content, call, EOS
    assert context == "\nt:abc\nu:go\na:"  # the template's, the tool's and the user's
    assert "".join(tokens) == f"?{call}{EOS}\nt:abc\nu:go\na:abd{EOS}"
    # ends where the run's own episodes end: the last turn's EOS
    assert ids.token_ids[-1] == renderer.tokenizer.eos_token_id and ids.mask[-1] == 1
    assert ids.turn_tokens == [1 + len(call) + 1, len("\nt:abc\nu:go\na:"), 0, 4]
    assert sum(ids.turn_tokens) == len(ids.token_ids)


def test_the_prompt_is_the_runs_own_episode_prompt(renderer):
    ids = renderer.episode(PROMPT, episode())
    assert ids.prompt_ids == renderer.prompt(Example("", None, PROMPT), as_chat=True)[1]
    tools = [{"type": "function", "function": {"name": "look", "parameters": {}}}]
    with_tools = renderer.episode(PROMPT, episode(), tools)
    assert with_tools.prompt_ids == renderer.prompt(Example("", None, PROMPT, tools), True)[1]
    assert with_tools.token_ids == ids.token_ids  # tools change the prompt only, here


def test_a_template_that_does_not_render_message_by_message_is_refused():
    tokenizer = build_tokenizer()
    # numbers the conversation by its length, so a longer one is no extension of a shorter
    template = "{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}"
    renderer = Renderer(tokenizer, [tokenizer.eos_token_id], template)
    with pytest.raises(ChatTemplateError, match="renders message by message"):
        renderer.episode(PROMPT, episode())


def test_a_chat_group_becomes_a_rollout_masked_to_its_assistant_tokens(renderer):
    tokenizer = renderer.tokenizer
    group = load_groups([chat_group()], renderer)[0]
    assert group.example.prompt == renderer.prompt(group.example, as_chat=True)[0]
    assert group.example.item == {"answer": "abc"}
    assert group.completions == ["abc", "abd", "xyz", "a"]  # each episode's last turn
    rollout = as_rollout(group, tokenizer, tokenizer.eos_token_id, renderer=renderer)
    assert rollout.prompt_ids == renderer.prompt(group.example, as_chat=True)[1]
    for completion, last in zip(rollout.completions, group.completions, strict=True):
        ids = renderer.episode(PROMPT, episode(last=last))
        assert (completion.token_ids, completion.mask) == (ids.token_ids, ids.mask)
        assert completion.sampled_tokens == sum(ids.mask)
        assert [t.trained for t in completion.turns] == [True, False, False, True]
    # without the run's renderer, the tokenizer's own template gives the same ids
    assert as_rollout(group, tokenizer, tokenizer.eos_token_id) == rollout


# ---------------------------------------------------------------- in a run

SECRET_CODE = {
    "environment": {"type": "builtin", "name": "secret_code", "max_turns": 2},
    "reward": {"type": "builtin", "name": "exact_match"},  # unused: the environment scores
    "algorithm": {"group_size": 4, "beta": 0.05},
    "sampling": {"max_new_tokens": 4},
    "training": {
        "steps": 2,
        "prompts_per_step": 2,
        "mini_batches": 1,
        "offpolicy_fraction": 0.5,
    },
}


def teacher_groups(rows: list[dict]) -> list[dict]:
    """A teacher's episodes of secret_code rows: a first guess, the code revealed as the
    environment reveals it, and a second guess, rewarded as the environment would."""
    from service.contract.environments import SecretCodeParams
    from workers.environments.builtin import code_match

    reveal = SecretCodeParams().reveal
    groups = []
    for row in rows:
        code = row["answer"]
        guesses = [code, code[:2] + "z", "zzz", code[0]]  # z: never in a code
        episodes = [
            [
                {"role": "assistant", "content": "?"},
                {"role": "user", "content": reveal.format(answer=code)},
                {"role": "assistant", "content": guess},
            ]
            for guess in guesses
        ]
        groups.append(
            {
                "messages": row["messages"],
                "episodes": episodes,
                "rewards": [code_match(code, g) for g in guesses],
                "answer": code,
                "source": "teacher",
            }
        )
    return groups


def samples(settings, run_id: str) -> list:
    with session_scope(settings.resolved_database_url) as session:
        return session.scalars(
            select(Sample)
            .where(Sample.run_id == run_id)
            .order_by(Sample.step, Sample.group_index, Sample.sample_index)
        ).all()


@pytest.mark.both_backends
def test_a_run_trains_teacher_episodes_beside_its_own(settings, tiny_model_dir):
    rows = secret_code_rows(8)
    run_id = submit(
        settings,
        tiny_model_dir,
        train_rows=rows,
        offpolicy_rows=teacher_groups(rows),
        **SECRET_CODE,
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded", run_row(settings, run_id).error
    rows_ = samples(settings, run_id)
    assert len(rows_) == 2 * 2 * 4
    teacher = [s for s in rows_ if s.source == "teacher"]
    policy = [s for s in rows_ if s.source == "policy"]
    assert len(teacher) == len(policy) == 2 * 4  # one group of each per step
    for s in teacher:
        turns = s.episode["turns"]
        assert [t["role"] for t in turns] == ["assistant", "user", "assistant"]
        assert [t["trained"] for t in turns] == [True, False, True]
        # "?" + EOS, then the guess + EOS: only those carry the loss
        assert s.episode["trained_tokens"] == 2 + len(turns[2]["content"]) + 1
        assert s.completion == turns[2]["content"]
    rewards = sorted({round(s.reward, 4) for s in teacher})
    assert rewards == [0.0, round(1 / 3, 4), round(2 / 3, 4), 1.0]
    assert all(s.episode is not None for s in policy)  # the run's own episodes
    with session_scope(settings.resolved_database_url) as session:
        generated = session.get(Run, run_id).tokens_generated
    assert generated == sum(s.episode["trained_tokens"] for s in policy)  # its own only


def test_chat_groups_train_in_a_run_of_plain_chat_rows(settings, tiny_model_dir):
    """No environment: the run samples single completions of its chat rows, and takes the
    groups' episodes (scored by its reward, since they carry no rewards) as they are."""
    rows = secret_code_rows(8)
    groups = [{k: v for k, v in g.items() if k != "rewards"} for g in teacher_groups(rows)]
    run_id = submit(
        settings,
        tiny_model_dir,
        train_rows=rows,
        offpolicy_rows=groups,
        **{**SECRET_CODE, "environment": None},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded", run_row(settings, run_id).error
    teacher = [s for s in samples(settings, run_id) if s.source == "teacher"]
    assert len(teacher) == 2 * 4
    # exact_match on the last assistant turn: the teacher's right guess scores 1
    assert sorted(s.reward for s in teacher if s.sample_index == 0) == [1.0, 1.0]
    assert all(s.reward == 0.0 for s in teacher if s.sample_index > 0)


# ---------------------------------------------------------------- the dry run


def test_the_dry_run_of_a_chat_group_sums_the_assistant_tokens_only(tmp_path, tiny_model_dir):
    """pi_theta a differently seeded tiny model, pi_ref the run's: the log-ratios are summed
    over the assistant messages' characters and EOS, found here by hand from the text."""
    policy_dir = make_tiny_model(tmp_path / "policy", seed=7)
    episodes = [episode(last=w) for w in ("abc", "xyz", "a")]
    rewards = [1.0, 0.0, 0.5]
    task = DryRunTask(
        checkpoint_id="ckpt_x",
        checkpoint_path=str(policy_dir),
        checkpoint_kind=CheckpointKind.FULL,
        base_model=str(tiny_model_dir),
        messages=PROMPT,
        episodes=episodes,
        rewards=rewards,
        beta=0.2,
        max_tokens=65_536,
    )
    answer = answer_dry_run(Settings(torch_threads=1), task)
    assert answer.problem is None, answer.problem
    out = DryRunOutput.model_validate(answer.result)
    assert math.isfinite(out.loss)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    call = '<tool_call>{"name": "look", "arguments": {}}</tool_call>'
    prompt = "s:be brief\nu:code?\na:"
    s = []
    for e in episodes:
        last = e[-1]["content"]
        pieces = [(prompt, False), (f"?{call}", True), (EOS, True), ("\nt:abc\nu:go\na:", False)]
        pieces += [(last, True), (EOS, True)]
        s.append(
            masked_logprob(policy, tokenizer, pieces) - masked_logprob(reference, tokenizer, pieces)
        )
    assert [c.log_ratio for c in out.completions] == pytest.approx(s, abs=1e-4)
    assert [c.completion for c in out.completions] == ["abc", "xyz", "a"]
    trained = [len(f"?{call}") + 1 + len(e[-1]["content"]) + 1 for e in episodes]
    assert [c.tokens for c in out.completions] == trained
    k, r_mean, s_mean = 3, sum(rewards) / 3, sum(s) / 3
    w = [(r - r_mean) - 0.2 * (si - s_mean) for r, si in zip(rewards, s, strict=True)]
    assert out.loss == pytest.approx(0.5 * sum(x * x for x in w) / (k - 1), rel=1e-4)


def masked_logprob(model, tokenizer, pieces: list[tuple[str, bool]]) -> float:
    """log pi of the trained pieces' tokens given everything before them (the first piece is
    the prompt, whose first token is never predicted)."""
    ids, trained = [], []
    for text, train in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        trained += [train] * len(piece)
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(logps[t - 1, ids[t]].item() for t in range(1, len(ids)) if trained[t])


def test_a_chat_dry_run_request_is_checked(api, settings, tiny_model_dir, make_key):
    run_id = submit(settings, tiny_model_dir)
    key = make_key("loop")
    body = {"model": {"run_id": run_id}, "messages": PROMPT, "rewards": [1.0, 0.0]}
    cases = [
        ({"episodes": [episode(), episode()[1:]]}, "episodes[1] must start with an assistant"),
        ({"episodes": [episode()] * 3}, "3 episodes: give one reward per episode"),
        ({"episodes": [episode()] * 2, "prompt": "x"}, "not both"),
        ({}, "needs both 'messages' and 'episodes'"),
    ]
    for change, needle in cases:
        resp = api.post("/v1/gvpo:dry_run", headers=auth(key), json=body | change)
        assert_error(resp, 422, "invalid_request", needle)
    # a well-formed chat group gets as far as wanting a checkpoint (this run has none yet)
    good = body | {"episodes": [episode()] * 2}
    resp = api.post("/v1/gvpo:dry_run", headers=auth(key), json=good)
    assert_error(resp, 409, "conflict", "has no checkpoint yet")
