"""Sync reward webhooks against a real reward server over loopback HTTP."""

import socket

import pytest
from sqlalchemy import select

from service.db import session_scope
from service.models import Checkpoint, Run, RunEvent, Sample
from workers.execute import execute_run

from factories import (
    SPEC_DEFAULTS,
    assert_error,
    copy_rows,
    run_spec,
    submit,
    upload,
    webhook_secret,
)
from rebinding import FakeDNS
from reward_server import Behaviour, RewardServer
from services import closed_port, reference_server

pytestmark = pytest.mark.both_backends


@pytest.fixture
def hooks_settings(settings):
    return settings.model_copy(update={"webhook_allow_private": True})


def webhook_run(settings, model_dir, url: str, **reward) -> tuple[str, str]:
    spec = {"type": "webhook", "url": url, "mode": "sync", "timeout_s": 10, **reward}
    run_id = submit(settings, model_dir, reward=spec)
    return run_id, webhook_secret(settings, run_id)


def run_events(settings, run_id: str) -> list[RunEvent]:
    with session_scope(settings.resolved_database_url) as session:
        return list(
            session.scalars(select(RunEvent).where(RunEvent.run_id == run_id).order_by(RunEvent.id))
        )


def test_sync_webhook_rewards_are_the_servers(hooks_settings, tiny_model_dir):
    behaviour = Behaviour()
    with RewardServer(behaviour) as server:
        run_id, behaviour.secret = webhook_run(
            hooks_settings, tiny_model_dir, server.url, max_items_per_request=3
        )
        assert execute_run(hooks_settings, run_id, "worker-a") == "succeeded"
    with session_scope(hooks_settings.resolved_database_url) as session:
        samples = session.scalars(select(Sample).where(Sample.run_id == run_id)).all()
    assert len(samples) == 6 * 2 * 4 == len(behaviour.rewards)
    for s in samples:
        sid = f"smp_{run_id.removeprefix('run_')}_{s.step}_{s.group_index}_{s.sample_index}"
        assert s.reward == pytest.approx(behaviour.rewards[sid])
    assert len(behaviour.request_ids) == 6 * 3  # 8 items a step in batches of 3
    assert len(set(behaviour.request_ids)) == len(behaviour.request_ids)


def test_each_reward_request_looks_the_host_up_once(hooks_settings, tiny_model_dir, monkeypatch):
    """The check and the connection use one lookup (tests/test_outbound.py shows a rebinding
    name cannot move the connection): the submission's, then one per request."""
    dns = FakeDNS({"rm.test": [("127.0.0.1",)]})
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    behaviour = Behaviour()
    with RewardServer(behaviour) as server:
        url = server.url.replace("127.0.0.1", "rm.test")
        run_id, behaviour.secret = webhook_run(hooks_settings, tiny_model_dir, url)
        assert execute_run(hooks_settings, run_id, "worker-a") == "succeeded"
    assert behaviour.calls > 0 and dns.lookups["rm.test"] == 1 + behaviour.calls


def test_a_flaky_reward_model_is_retried(hooks_settings, tiny_model_dir):
    behaviour = Behaviour(fail_first=2)
    with RewardServer(behaviour) as server:
        run_id, behaviour.secret = webhook_run(hooks_settings, tiny_model_dir, server.url)
        assert execute_run(hooks_settings, run_id, "worker-a") == "succeeded"
    retries = [e for e in run_events(hooks_settings, run_id) if e.type == "reward.retry"]
    assert len(retries) == 2
    assert all("HTTP 503" in e.message and server.url in e.message for e in retries)


def test_a_reward_model_that_stays_down_fails_the_run_and_keeps_checkpoints(
    hooks_settings, tiny_model_dir
):
    behaviour = Behaviour(fail_after=3, retry_after=None)  # steps 1-3 are scored, then down
    with RewardServer(behaviour) as server:
        run_id, behaviour.secret = webhook_run(
            hooks_settings, tiny_model_dir, server.url, max_attempts=3
        )
        assert execute_run(hooks_settings, run_id, "worker-a") == "failed"
    with session_scope(hooks_settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
        ckpts = session.scalars(select(Checkpoint.step).where(Checkpoint.run_id == run_id)).all()
    assert run.step == 3 and ckpts == [3]
    assert server.url in run.error and "3 tries" in run.error and "HTTP 503" in run.error
    events = run_events(hooks_settings, run_id)
    assert [e.type for e in events].count("reward.retry") == 2
    assert events[-1].type == "run.failed" and server.url in events[-1].message


@pytest.mark.parametrize(
    ("lie", "needle"),
    [
        ("nan", "non-finite"),
        ("unknown_id", "unknown or repeated sample_id"),
        ("missing", "without a reward"),
        ("status_404", "HTTP 404"),
    ],
)
def test_a_lying_reward_model_fails_fast(hooks_settings, tiny_model_dir, lie, needle):
    behaviour = Behaviour(lie=lie)
    with RewardServer(behaviour) as server:
        run_id, behaviour.secret = webhook_run(hooks_settings, tiny_model_dir, server.url)
        assert execute_run(hooks_settings, run_id, "worker-a") == "failed"
    with session_scope(hooks_settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
    assert needle in run.error and run.step == 0
    assert behaviour.calls == 1  # not retried


def test_a_wrong_secret_is_refused_by_the_receiver(hooks_settings, tiny_model_dir):
    behaviour = Behaviour(secret="not-the-runs-secret")
    with RewardServer(behaviour) as server:
        run_id, _ = webhook_run(hooks_settings, tiny_model_dir, server.url)
        assert execute_run(hooks_settings, run_id, "worker-a") == "failed"
    assert behaviour.calls == 0


def _create(api, key: str, model_dir, reward: dict):
    from factories import auth

    train_file = upload(api, key, copy_rows(4), filename="t.jsonl")
    body = run_spec(model_dir, train_file, SPEC_DEFAULTS, reward=reward)
    return api.post("/v1/runs", headers=auth(key), json=body)


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("http://127.0.0.1:9/score", "reward.url"),
        ("http://10.1.2.3/score", "reward.url"),
        ("http://169.254.169.254/latest", "reward.url"),
        ("http://localhost/score", "reward.url"),
        ("ftp://example.org/x", "reward.url"),
        ("https://user:password@example.org/score", "reward.url"),  # stored with the spec
        # IPv6 forms that embed or map to a private IPv4 address
        ("http://[::ffff:127.0.0.1]/score", "reward.url"),  # IPv4-mapped
        ("http://[2002:a01:203::1]/score", "reward.url"),  # 6to4 of 10.1.2.3
        ("http://[64:ff9b::a9fe:a9fe]/latest", "reward.url"),  # NAT64 of 169.254.169.254
        ("http://[64:ff9b:1::1]/score", "reward.url"),  # NAT64 local use
        ("http://[::7f00:1]/score", "reward.url"),  # IPv4-compatible 127.0.0.1
        ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/x", "reward.url"),  # Teredo
    ],
)
def test_private_webhook_urls_are_refused_at_submission(api, make_key, tiny_model_dir, url, field):
    resp = _create(api, make_key(), tiny_model_dir, {"type": "webhook", "url": url})
    assert_error(resp, 422, "invalid_request")
    assert [f["field"] for f in resp.json()["error"]["details"]["fields"]] == [field]
    composite = {
        "type": "composite",
        "components": [{"type": "builtin", "name": "exact_match"}, {"type": "webhook", "url": url}],
    }
    resp = _create(api, make_key(), tiny_model_dir, composite)
    assert [f["field"] for f in resp.json()["error"]["details"]["fields"]] == [
        "reward.components.1.url"
    ]


def test_public_and_allowed_private_webhook_urls_are_accepted(settings, make_key, tiny_model_dir):
    from fastapi.testclient import TestClient

    from service.main import create_app

    with TestClient(create_app(settings)) as api:
        assert (
            _create(
                api,
                make_key(),
                tiny_model_dir,
                {"type": "webhook", "url": "https://93.184.215.14/score"},
            ).status_code
            == 201
        )
    allowed = settings.model_copy(update={"webhook_allow_private": True})
    with TestClient(create_app(allowed)) as api:
        assert (
            _create(
                api, make_key(), tiny_model_dir, {"type": "webhook", "url": "http://127.0.0.1:9/x"}
            ).status_code
            == 201
        )


def test_the_reference_reward_server_works_as_documented(hooks_settings, tiny_model_dir):
    secret = "whsec_reference_reward_server_0123"  # brought by the run: the server starts first
    env = {"REWARD_WEBHOOK_SECRET": secret}
    with reference_server("examples.reward_server:app", "/score", env) as url:
        reward = {"type": "webhook", "url": url, "mode": "sync", "timeout_s": 10}
        run_id = submit(hooks_settings, tiny_model_dir, reward=reward, webhook_secret=secret)
        assert execute_run(hooks_settings, run_id, "worker-a") == "succeeded"
    with session_scope(hooks_settings.resolved_database_url) as session:
        samples = session.scalars(select(Sample).where(Sample.run_id == run_id)).all()
    assert samples and all(s.reward == float(s.completion.strip() == s.answer) for s in samples)


def test_an_optional_probe_refuses_a_reward_url_that_cannot_be_reached(
    hooks_settings, make_key, tiny_model_dir
):
    """probe: true asks the URL for any answer at submission (a HEAD: no data, no signature);
    without it, nothing is sent before the run."""
    from fastapi.testclient import TestClient

    from service.main import create_app

    behaviour = Behaviour()
    with (
        TestClient(create_app(hooks_settings)) as api,
        RewardServer(behaviour) as server,
        closed_port() as port,
    ):
        closed = f"http://127.0.0.1:{port}/score"  # nothing listens there
        key = make_key()
        hook = {"type": "webhook", "url": server.url, "probe": True}
        # it answers (405 to HEAD is fine)
        assert _create(api, key, tiny_model_dir, hook).status_code == 201
        resp = _create(api, key, tiny_model_dir, {**hook, "url": closed})
        error = assert_error(resp, 422, "invalid_request", "could not be reached")
        assert [f["field"] for f in error["details"]["fields"]] == ["reward.url"]
        composite = {
            "type": "composite",
            "components": [{"type": "builtin", "name": "exact_match"}, {**hook, "url": closed}],
        }
        error = assert_error(_create(api, key, tiny_model_dir, composite), 422, "invalid_request")
        assert [f["field"] for f in error["details"]["fields"]] == ["reward.components.1.url"]
        unprobed = {**hook, "url": closed, "probe": False}
        assert _create(api, key, tiny_model_dir, unprobed).status_code == 201
    assert behaviour.calls == 0  # a probe is not a reward request
