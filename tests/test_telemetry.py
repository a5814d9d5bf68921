"""GET /metrics (Prometheus text format): this process's API traffic, and the state of every
run read from the database: runs by state, queue depth, worker heartbeats, step phase timings,
reward webhook retries."""

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.db import session_scope
from service.main import create_app
from service.models.run_event import add_event
from workers.records import RunRecorder

from factories import assert_error, auth, submit
from services import serve_api

pytestmark = pytest.mark.both_backends


TOKEN = "metrics-token-for-the-tests"


def scrape(api) -> dict[tuple[str, tuple], float]:
    resp = api.get("/metrics", headers=auth(TOKEN))
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def test_metrics_report_runs_queues_heartbeats_steps_and_requests(
    settings, tiny_model_dir, make_key
):
    running = submit(settings, tiny_model_dir)
    submit(settings, tiny_model_dir)  # stays queued
    recorder = RunRecorder(settings, running, "worker-7")
    recorder.claim()
    recorder.record_step(
        1,
        {
            "time/rollout_s": 0.25,
            "time/reward_s": 1.5,
            "time/learn_s": 0.5,
            "time/weight_sync_s": 0.0,
            "loss": 0.1,
        },
        [],
        tokens=10,
    )
    recorder.record_step(
        2,
        {
            "time/rollout_s": 0.3,
            "time/reward_s": 2.5,
            "time/learn_s": 0.75,
            "time/weight_sync_s": 0.01,
        },
        [],
        tokens=10,
    )
    with session_scope(settings.resolved_database_url) as session:
        add_event(session, running, "reward.retry", "webhook 503; retrying", "warning")

    operator = {"reaper_interval_s": 0, "metrics_token": TOKEN}
    with TestClient(create_app(settings.model_copy(update=operator))) as api:
        key = make_key()
        assert api.get(f"/v1/runs/{running}", headers=auth(key)).status_code == 404
        m = scrape(api)

    assert m[("gvpo_runs", (("state", "running"),))] == 1
    assert m[("gvpo_runs", (("state", "queued"),))] == 1
    assert m[("gvpo_runs", (("state", "failed"),))] == 0
    assert m[("gvpo_queue_depth", (("queue", "default"),))] == 1
    age = m[("gvpo_worker_heartbeat_age_seconds", (("run_id", running), ("worker", "worker-7")))]
    assert 0 <= age < 5  # claimed a moment ago
    phases = {
        p: m[("gvpo_step_phase_seconds", (("phase", p), ("run_id", running)))]
        for p in ("rollout", "reward", "learn")
    }
    assert phases == {"rollout": 0.3, "reward": 2.5, "learn": 0.75}  # the latest step
    assert m[("gvpo_reward_seconds", (("run_id", running),))] == 2.5
    assert m[("gvpo_reward_webhook_retries", (("run_id", running),))] == 1
    got = (
        "gvpo_http_requests_total",
        (("method", "GET"), ("route", "/v1/runs/{run_id}"), ("status", "404")),
    )
    assert m[got] == 1  # by route template, not by id
    assert (
        m[
            (
                "gvpo_http_request_duration_seconds_count",
                (("method", "GET"), ("route", "/v1/runs/{run_id}")),
            )
        ]
        == 1
    )


def test_metrics_are_for_the_operator_only(settings, make_key):
    """/metrics names every running run: a tenant's API key does not open it, the operator's
    token does; with no token set, only a client on this machine (loopback) may read it."""
    with TestClient(create_app(settings.model_copy(update={"metrics_token": TOKEN}))) as api:
        for headers in ({}, auth(make_key()), auth(TOKEN + "x"), {"Authorization": TOKEN}):
            assert_error(api.get("/metrics", headers=headers), 401, "unauthorized", "token")
        assert api.get("/metrics", headers=auth(TOKEN)).status_code == 200
    with TestClient(create_app(settings)) as api:  # the test client is no loopback address
        assert_error(api.get("/metrics"), 401, "unauthorized", "GVPO_METRICS_TOKEN")
    with serve_api(settings) as live:
        assert httpx.get(f"http://127.0.0.1:{live.api_port}/metrics").status_code == 200
