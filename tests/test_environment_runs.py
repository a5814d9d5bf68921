"""Runs with a webhook environment over loopback HTTP (in-process run loop): what the worker
sends, and how a failing or lying environment ends the run."""

import pytest
from sqlalchemy import select

from service.db import session_scope
from service.models import Checkpoint, Metric, Run, RunEvent, Sample
from workers.execute import execute_run

from environment_server import EnvBehaviour, EnvironmentServer
from factories import submit, webhook_secret

pytestmark = pytest.mark.both_backends

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": f"q{i}"}], "answer": str(i), "level": i % 3}
    for i in range(8)
]


@pytest.fixture
def hooks_settings(settings):
    return settings.model_copy(update={"webhook_allow_private": True})


def environment_run(settings, model_dir, url: str, **environment) -> tuple[str, str]:
    spec = {"type": "webhook", "url": url, "timeout_s": 10, "max_turns": 3, **environment}
    run_id = submit(
        settings,
        model_dir,
        train_rows=CHAT_ROWS,
        environment=spec,
        reward={"type": "builtin", "name": "regex", "params": {"pattern": "[a-z]"}},
    )
    return run_id, webhook_secret(settings, run_id)


def run_events(settings, run_id: str) -> list[RunEvent]:
    with session_scope(settings.resolved_database_url) as session:
        stmt = select(RunEvent).where(RunEvent.run_id == run_id).order_by(RunEvent.id)
        return list(session.scalars(stmt))


def test_the_environment_sees_every_turn_and_ends_episodes(hooks_settings, tiny_model_dir):
    behaviour = EnvBehaviour()
    with EnvironmentServer(behaviour) as server:
        run_id, behaviour.secret = environment_run(hooks_settings, tiny_model_dir, server.url)
        assert execute_run(hooks_settings, run_id, "worker-a") == "succeeded"
    first = behaviour.payloads[0]
    assert (first["type"], first["step"], first["turn"], first["purpose"]) == (
        "environment.step",
        1,
        1,
        "train",
    )
    assert len(first["items"]) == 2 * 4  # every episode of the step's 2 prompts, k = 4
    item = first["items"][0]
    assert item["item"] == {"answer": item["item"]["answer"], "level": item["item"]["level"]}
    assert item["messages"][0]["role"] == "user" and item["messages"][-1]["role"] == "assistant"
    second = behaviour.payloads[1]
    assert second["turn"] == 2 and [m["role"] for m in second["items"][0]["messages"]] == [
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    with session_scope(hooks_settings.resolved_database_url) as session:
        samples = session.scalars(select(Sample).where(Sample.run_id == run_id)).all()
        rewards = [s.reward for s in samples]
        episode = samples[0].episode
    # the environment's reward (4 messages / 10), not the run's regex
    assert rewards == [pytest.approx(0.4)] * len(rewards)
    assert [t["role"] for t in episode["turns"]] == ["assistant", "tool", "assistant"]
    assert [t["trained"] for t in episode["turns"]] == [True, False, True]
    assert episode["end"] == "done"


def test_an_environment_that_stays_down_fails_the_run_and_keeps_checkpoints(
    hooks_settings, tiny_model_dir
):
    behaviour = EnvBehaviour(fail_after=6, retry_after=None)  # two turns a step: 3 steps
    with EnvironmentServer(behaviour) as server:
        run_id, behaviour.secret = environment_run(
            hooks_settings, tiny_model_dir, server.url, max_attempts=3
        )
        assert execute_run(hooks_settings, run_id, "worker-a") == "failed"
    with session_scope(hooks_settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
        ckpts = session.scalars(select(Checkpoint.step).where(Checkpoint.run_id == run_id)).all()
    assert run.step == 3 and ckpts == [3]
    assert server.url in run.error and "3 tries" in run.error and "HTTP 503" in run.error
    events = run_events(hooks_settings, run_id)
    assert [e.type for e in events].count("environment.retry") == 2
    assert events[-1].type == "run.failed" and server.url in events[-1].message


@pytest.mark.parametrize(
    ("lie", "needles"),
    [
        ("reward_not_done", ["results[7].reward", "ep_"]),
        ("bad_role", ["results[0].messages[0].role", "ep_"]),
        ("missing", ["ep_", "no result"]),
        ("not_json", ["not JSON"]),
    ],
)
def test_a_malformed_environment_answer_fails_the_run_naming_episode_and_field(
    hooks_settings, tiny_model_dir, lie, needles
):
    behaviour = EnvBehaviour(lie=lie)
    with EnvironmentServer(behaviour) as server:
        run_id, behaviour.secret = environment_run(hooks_settings, tiny_model_dir, server.url)
        assert execute_run(hooks_settings, run_id, "worker-a") == "failed"
    with session_scope(hooks_settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
    for needle in needles:
        assert needle in run.error, run.error
    assert run.step == 0 and behaviour.calls == 1  # not retried
    assert run_events(hooks_settings, run_id)[-1].type == "run.failed"


def test_evaluation_plays_episodes_with_the_environment(hooks_settings, tiny_model_dir):
    behaviour = EnvBehaviour()
    with EnvironmentServer(behaviour) as server:
        spec = {"type": "webhook", "url": server.url, "timeout_s": 10, "max_turns": 3}
        run_id = submit(
            hooks_settings,
            tiny_model_dir,
            train_rows=CHAT_ROWS,
            eval_rows=CHAT_ROWS[:3],
            environment=spec,
            training={"steps": 2},
            eval={"every_steps": 2, "samples_per_prompt": 4, "k": 2, "pass_threshold": 0.4},
        )
        behaviour.secret = webhook_secret(hooks_settings, run_id)
        assert execute_run(hooks_settings, run_id, "worker-a") == "succeeded"
    evals = [p for p in behaviour.payloads if p["purpose"] == "eval"]
    assert [p["turn"] for p in evals] == [1, 2] and len(evals[0]["items"]) == 3 * 4
    assert all("_eval2_" in item["episode_id"] for item in evals[0]["items"])
    with session_scope(hooks_settings.resolved_database_url) as session:
        got = {
            m.name: m.value
            for m in session.scalars(
                select(Metric).where(Metric.run_id == run_id, Metric.name.like("eval/%"))
            )
        }
    # every episode ends with the environment's reward, 0.4 (4 messages / 10): each passes
    assert got == {
        "eval/reward_mean": pytest.approx(0.4),
        "eval/pass@1": pytest.approx(1.0),
        "eval/pass@k": pytest.approx(1.0),
    }
