"""The environment webhook client against a real environment over loopback HTTP: signed,
batched, retried like reward requests, and failing the run on an answer that breaks the
protocol with a message that names the episode and the field."""

from dataclasses import dataclass, field

import pytest

from service.contract.environments import WebhookEnvironment
from workers.environments.base import EpisodeView, Reply
from workers.environments.webhook import WebhookEnvironmentClient
from workers.errors import RunError
from workers.rewards.webhook import WebhookContext

from environment_server import EnvBehaviour, EnvironmentServer
from services import closed_port

SECRET = "whsec_environment_test"
RUN_ID = "run_abc123"


@dataclass
class Run:
    """The run's side of the calls: what it recorded, and a sleep that returns at once."""

    retries: list[tuple[str, dict]] = field(default_factory=list)
    sleeps: list[float] = field(default_factory=list)

    def context(self, max_response_bytes: int = 1_000_000) -> WebhookContext:
        return WebhookContext(
            run_id=RUN_ID,
            secret=lambda: SECRET,
            callback_url="",  # reward-only: unused by environments
            allow_private=True,  # the environment listens on loopback
            max_response_bytes=max_response_bytes,
            on_retry=lambda message, data: self.retries.append((message, data)),
            open_request=lambda *_: None,
            results=lambda ids: {},
            sleep=self.sleeps.append,
        )


def client(url: str, run: Run, max_response_bytes: int = 1_000_000, **spec):
    environment = WebhookEnvironment(type="webhook", url=url, timeout_s=10, **spec)
    return WebhookEnvironmentClient(environment, run.context(max_response_bytes))


def episodes(n: int) -> list[EpisodeView]:
    """n live episodes after the policy's first turn, two to a group."""
    call = {"id": "call_0", "type": "function", "function": {"name": "python", "arguments": "{}"}}
    return [
        EpisodeView(
            episode_id=f"ep_abc123_3_{i // 2}_{i % 2}",
            group_id=f"grp_abc123_3_{i // 2}",
            item={"answer": str(i)},
            messages=[
                {"role": "user", "content": f"what is {i}?"},
                {"role": "assistant", "content": "let me run it", "tool_calls": [call]},
            ],
        )
        for i in range(n)
    ]


def test_each_turn_goes_out_signed_in_batches_and_every_episode_gets_its_reply():
    """5 episodes, 2 to a request: 3 requests, each verified by the environment with the run's
    secret, and the replies come back in the episodes' order."""
    run, live = Run(), episodes(5)
    with EnvironmentServer(EnvBehaviour(secret=SECRET)) as server:
        env = client(server.url, run, max_items_per_request=2)
        replies = env.step(3, 1, live, "train")
        finals = env.step(3, 2, live[:1], "eval")
        env.close()
    b = server.behaviour
    assert b.calls == 4  # every request verified (an unsigned one would have been a 401)
    assert [len(p["items"]) for p in b.payloads] == [2, 2, 1, 1]
    sent = [item["episode_id"] for p in b.payloads[:3] for item in p["items"]]
    assert sent == [e.episode_id for e in live]
    assert b.payloads[0]["items"][0]["messages"] == live[0].messages
    assert b.payloads[0]["items"][0]["item"] == {"answer": "0"}
    heads = [{k: p[k] for k in ("type", "run_id", "step", "turn", "purpose")} for p in b.payloads]
    assert heads[0] == {
        "type": "environment.step",
        "run_id": RUN_ID,
        "step": 3,
        "turn": 1,
        "purpose": "train",
    }
    assert heads[3]["turn"] == 2 and heads[3]["purpose"] == "eval"
    # deterministic per step, turn and batch, and a tag for this execution of the turn
    assert [p["request_id"] for p in b.payloads] == b.request_ids
    assert [rid.rsplit("_", 1)[0] for rid in b.request_ids] == [
        "rq_abc123_3_t1_0",
        "rq_abc123_3_t1_1",
        "rq_abc123_3_t1_2",
        "rq_abc123_eval3_t2_0",
    ]
    tool = {"role": "tool", "content": "42", "tool_call_id": "call_0"}
    assert replies == [Reply(messages=[tool], done=False, reward=None)] * 5
    assert finals == [Reply(messages=[], done=True, reward=0.2)]
    assert run.retries == []


def test_no_live_episodes_send_nothing():
    run = Run()
    with EnvironmentServer(EnvBehaviour(secret=SECRET)) as server:
        assert client(server.url, run).step(1, 1, [], "train") == []
    assert server.behaviour.calls == 0


def test_an_overloaded_environment_is_retried_with_events():
    run = Run()
    with EnvironmentServer(EnvBehaviour(secret=SECRET, fail_first=2)) as server:
        env = client(server.url, run, max_attempts=3)
        replies = env.step(1, 1, episodes(2), "train")
        env.close()
    assert len(replies) == 2 and server.behaviour.calls == 3
    assert run.sleeps == [0.0, 0.0]  # the environment's Retry-After: 0
    assert [m for m, _ in run.retries] == [
        f'environment webhook {server.url} answered HTTP 503: \'{{"error":"overloaded"}}\'; '
        f"retry {n} of 2 in 0.0 s"
        for n in (1, 2)
    ]
    data = run.retries[0][1]
    assert data["url"] == server.url and data["attempt"] == 1
    assert data["request_id"] == server.behaviour.request_ids[0]  # the same request, again


def test_an_environment_that_stays_down_fails_the_run_naming_url_answer_and_tries():
    run = Run()
    with closed_port() as port:
        url = f"http://127.0.0.1:{port}/step"
        env = client(url, run, max_attempts=3)
        with pytest.raises(RunError) as failure:
            env.step(1, 1, episodes(2), "train")
        env.close()
    message = str(failure.value)
    assert message.startswith(f"environment webhook {url} failed after 3 tries; last answer: ")
    assert "ConnectError" in message
    assert len(run.retries) == 2
    # no Retry-After: full jitter under 0.5 s, then 1 s
    assert 0 <= run.sleeps[0] <= 0.5 and 0 <= run.sleeps[1] <= 1.0


BROKEN_ANSWERS = {  # EnvBehaviour.lie -> what the run's error says (3 episodes sent)
    "reward_not_done": "answered an invalid result for episode ep_abc123_3_1_0: "
    "results[2].reward: Value error, a reward is given only with done: true",
    "bad_role": "answered an invalid result for episode ep_abc123_3_0_0: "
    "results[0].messages[0].role: Input should be 'tool' or 'user'",
    "missing": "answered no result for episode ep_abc123_3_1_0: results lacks 1 of the 3 episodes",
    "unknown": "answered a result for episode 'ep_not_mine', which it was not sent: "
    "results[0].episode_id",
    "repeated": "answered a second result for episode ep_abc123_3_0_0: results[2].episode_id",
    "not_json": "answered 200 with a body that is not JSON: '<html>502 from a proxy",
}


@pytest.mark.parametrize("lie", BROKEN_ANSWERS)
def test_an_answer_that_breaks_the_protocol_fails_at_once(lie):
    needle = BROKEN_ANSWERS[lie]
    run = Run()
    with EnvironmentServer(EnvBehaviour(secret=SECRET, lie=lie)) as server:
        env = client(server.url, run)
        with pytest.raises(RunError) as failure:
            env.step(3, 1, episodes(3), "train")
        env.close()
    assert str(failure.value).startswith(f"environment webhook {server.url} ")
    assert needle in str(failure.value)
    assert server.behaviour.calls == 1 and run.retries == []  # not retried


def test_an_answer_past_the_size_cap_fails_the_run():
    run = Run()
    with EnvironmentServer(EnvBehaviour(secret=SECRET, lie="oversized")) as server:
        env = client(server.url, run, max_response_bytes=2_000)
        with pytest.raises(RunError, match="sent more than 2000 bytes") as failure:
            env.step(1, 1, episodes(2), "train")
        env.close()
    assert server.url in str(failure.value) and server.behaviour.calls == 1


def test_a_wrong_secret_is_refused_by_the_environment_and_fails_the_run():
    run = Run()
    with EnvironmentServer(EnvBehaviour(secret="not-the-runs-secret")) as server:
        env = client(server.url, run)
        with pytest.raises(RunError, match="answered HTTP 401") as failure:
            env.step(1, 1, episodes(1), "train")
        env.close()
    assert "an environment must answer 200 with results" in str(failure.value)
    assert server.behaviour.calls == 0


def test_a_private_address_is_refused_unless_allowed():
    run = Run()
    env = WebhookEnvironmentClient(
        WebhookEnvironment(type="webhook", url="http://127.0.0.1:9/step"),
        WebhookContext(**{**vars(run.context()), "allow_private": False}),
    )
    with pytest.raises(RunError, match=r"http://127.0.0.1:9/step may not be called: host"):
        env.step(1, 1, episodes(1), "train")
    env.close()
    assert run.retries == []
