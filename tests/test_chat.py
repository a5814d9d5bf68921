"""Chat rows (DESIGN.md §v2.1): uploads checked line by line, prompts rendered by the model's
chat template or the run's own, single-turn chat runs whose rewards see the assistant's text,
and episodes that end truncated."""

import pytest
from sqlalchemy import select

from service.db import session_scope
from service.models import Metric, Sample
from workers.chat import Renderer
from workers.execute import execute_run
from workers.tiny_model import CHAT_TEMPLATE

from environment_server import EnvBehaviour, EnvironmentServer
from factories import assert_error, auth, post_file, submit, upload

CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Say a letter."},
            {"role": "user", "content": f"q{i}"},
        ],
        "answer": "a",
    }
    for i in range(8)
]


def samples(settings, run_id: str) -> list[Sample]:
    with session_scope(settings.resolved_database_url) as session:
        rows = session.scalars(select(Sample).where(Sample.run_id == run_id)).all()
        for row in rows:
            session.expunge(row)
        return rows


def metric(settings, run_id: str, name: str) -> list[float]:
    with session_scope(settings.resolved_database_url) as session:
        stmt = select(Metric.value).where(Metric.run_id == run_id, Metric.name == name)
        return list(session.scalars(stmt.order_by(Metric.step)))


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0] 'role' must be one of"),
        ({"messages": [{"role": "user"}]}, "messages[0] needs 'content'"),
        ({"messages": [{"role": "user", "content": 5}]}, "'content' must be a string"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
            "only assistant messages carry 'tool_calls'",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "tools": "python"}, "'tools' must be"),
    ],
)
def test_a_bad_chat_row_is_refused_naming_its_line(api, make_key, row, needle):
    key = make_key()
    resp = post_file(api, key, [CHAT[0], row])
    error = assert_error(resp, 400, "bad_request", "line 2 is not a chat row", needle)
    assert error["details"] == {"line": 2}


def test_a_chat_file_needs_no_prompt_or_answer_field(api, make_key, tiny_model_dir):
    key = make_key()
    rows = [{k: v for k, v in row.items() if k != "answer"} for row in CHAT]
    file_id = upload(api, key, rows)
    assert api.get(f"/v1/files/{file_id}", headers=auth(key)).json()["fields"] == ["messages"]
    spec = {
        "model": {"path": str(tiny_model_dir)},
        "dataset": {"train_file": file_id},
        "reward": {"type": "builtin", "name": "regex", "params": {"pattern": "a"}},
        "sampling": {"max_new_tokens": 8},
    }
    assert api.post("/v1/runs", headers=auth(key), json=spec).status_code == 201


def test_the_tiny_models_template_renders_chats_and_tools(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    tools = [{"type": "function", "function": {"name": "python"}}]
    text = tokenizer.apply_chat_template(
        CHAT[0]["messages"], tools=tools, add_generation_prompt=True, tokenize=False
    )
    assert text == 's:tools [{"type": "function", "function": {"name": "python"}}]\n' + (
        "s:Say a letter.\nu:q0\na:"
    )


def test_a_developer_message_reaches_the_template_as_a_system_one(tiny_model_dir):
    from transformers import AutoTokenizer

    from workers.data import example_of

    developer = {"role": "developer", "content": "Say a letter."}
    row = {"messages": [developer, {"role": "user", "content": "q0"}], "answer": "a"}
    renderer = Renderer(AutoTokenizer.from_pretrained(tiny_model_dir), [2])
    text, _ = renderer.prompt(example_of(row, "prompt", "answer", 1))
    assert text == "s:Say a letter.\nu:q0\na:"
    assert row["messages"][0] == developer  # the row itself is left as it was


def test_a_single_turn_chat_run_rewards_the_assistants_text(settings, tiny_model_dir):
    # A reward only a reply that is exactly one "a" earns: the assistant's text alone, not the
    # rendered prompt (which holds "a:") and not the template's end-of-turn token.
    run_id = submit(
        settings,
        tiny_model_dir,
        train_rows=CHAT,
        reward={"type": "builtin", "name": "exact_match"},
        training={"steps": 2},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    got = samples(settings, run_id)
    rendered = {f"s:Say a letter.\nu:q{i}\na:" for i in range(8)}
    assert got and all(s.prompt in rendered and s.episode is None for s in got)
    assert all(s.reward == float(s.completion.strip() == "a") for s in got)


def test_a_runs_own_chat_template_replaces_the_tokenizers(settings, tiny_model_dir):
    template = (
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    run_id = submit(
        settings,
        tiny_model_dir,
        train_rows=CHAT,
        model={"chat_template": template},
        reward={"type": "builtin", "name": "regex", "params": {"pattern": "[a-z]"}},
        training={"steps": 1},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    prompts = {s.prompt for s in samples(settings, run_id)}
    assert prompts <= {f"[system] Say a letter.\n[user] q{i}\n[assistant] " for i in range(8)}


def test_the_renderer_appends_a_turn_as_the_template_renders_it(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    renderer = Renderer(tokenizer, [tokenizer.eos_token_id])
    sampled = tokenizer("hi", add_special_tokens=False)["input_ids"]
    closed = renderer.close_turn(sampled)  # cut by max_new_tokens: the template's EOS and "\n"
    assert tokenizer.decode(closed) == "</s>\n"
    assert tokenizer.decode(renderer.close_turn([*sampled, tokenizer.eos_token_id])) == "\n"
    observed = renderer.observation([{"role": "tool", "content": "42"}])
    assert tokenizer.decode(observed) == "t:42\na:"


@pytest.mark.parametrize(
    ("environment", "end"),
    [({"max_turns": 1}, "max_turns"), ({"max_episode_tokens": 8}, "max_episode_tokens")],
)
def test_episodes_past_their_limits_end_truncated_and_are_counted(
    settings, tiny_model_dir, environment, end
):
    hooks = settings.model_copy(update={"webhook_allow_private": True})
    behaviour = EnvBehaviour()  # answers turn 1 with a tool message: the episode would go on
    with EnvironmentServer(behaviour) as server:
        spec = {"type": "webhook", "url": server.url, "timeout_s": 10, **environment}
        run_id = submit(
            hooks,
            tiny_model_dir,
            train_rows=CHAT,
            environment=spec,
            sampling={"max_new_tokens": 5},
            reward={"type": "builtin", "name": "regex", "params": {"pattern": "[a-z]"}},
            training={"steps": 2},
        )
        from factories import webhook_secret

        behaviour.secret = webhook_secret(hooks, run_id)
        assert execute_run(hooks, run_id, "worker-a") == "succeeded"
    got = samples(hooks, run_id)
    assert {s.episode["end"] for s in got} == {end}
    assert all(s.episode["tokens"] <= environment.get("max_episode_tokens", 10**6) for s in got)
    assert metric(hooks, run_id, "episode/truncated_frac") == [1.0, 1.0]
    assert metric(hooks, run_id, "episode/turns_mean") == [1.0, 1.0]
