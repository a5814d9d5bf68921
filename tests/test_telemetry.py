"""GET /metrics (Prometheus text format): this process's API traffic, and the state of every
run read from the database: runs by state, queue depth, worker heartbeats, step phase timings,
reward webhook retries."""

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.db import session_scope
from service.main import create_app
from service.models.run_event import add_event
from workers.records import RunRecorder

from factories import auth, submit

pytestmark = pytest.mark.both_backends


def scrape(api) -> dict[tuple[str, tuple], float]:
    resp = api.get("/metrics")
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

    with TestClient(create_app(settings.model_copy(update={"reaper_interval_s": 0}))) as api:
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
