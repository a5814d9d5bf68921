"""Faults with real processes: a worker SIGKILLed in the middle of a run; the broker missing at
submit time. The API's reaper requeues what no worker will finish; runs lose nothing."""

import os
import signal
import time

from datetime import timedelta

import pytest
from factories import auth, copy_rows, write_jsonl
from conftest import CLUSTER_SECRETS, backend_settings
from services import start_redis
from test_e2e import cli, make_settings, project_with_file, spec, wait_for

from service.db import session_scope
from service.models import Run
from service.runs.reaper import reap_runs
from service.stack import Stack, free_port

pytestmark = pytest.mark.slow

STEPS = 300


@pytest.mark.both_backends
def test_worker_killed_mid_run_resumes_on_a_new_worker(tmp_path, tiny_model_dir, request,
                                                       backend):
    settings = make_settings(tmp_path / "faults", lease_seconds=3.0, reaper_interval_s=1.0,
                             **backend_settings(request, backend))
    cli(settings, "db", "upgrade")
    with Stack(settings, log_dir=settings.resolved_data_dir / "logs") as stack:
        http, file_id = project_with_file(settings, stack.url, "faults", tmp_path)
        body = {**spec(tiny_model_dir, file_id, steps=STEPS),
                "checkpoint": {"every_steps": 25, "keep_last": None}}
        run_id = http.post("/v1/runs", json=body).json()["id"]
        deadline = time.monotonic() + 120
        while not http.get(f"/v1/runs/{run_id}/checkpoints").json()["data"]:
            assert time.monotonic() < deadline, "no checkpoint before the kill"
            time.sleep(0.05)

        worker = stack.procs["worker"]
        os.killpg(worker.pid, signal.SIGKILL)  # the worker and its pool child, no clean-up
        worker.wait()
        at_kill = http.get(f"/v1/runs/{run_id}").json()
        assert at_kill["status"] == "running" and at_kill["step"] < STEPS
        latest = max(c["step"] for c in http.get(f"/v1/runs/{run_id}/checkpoints").json()["data"])

        stack.start_worker()
        run = wait_for(http, run_id, {"succeeded", "failed", "cancelled"}, timeout=300)
        assert run["status"] == "succeeded", run["error"]
        metrics = http.get(f"/v1/runs/{run_id}/metrics", params={"names": "loss"}).json()
        events = http.get(f"/v1/runs/{run_id}/events", params={"limit": 1000}).json()["data"]

    assert [s for s, _ in metrics["metrics"]["loss"]] == list(range(1, STEPS + 1))  # once each
    types = [e["type"] for e in events]
    assert types.count("run.requeued") == 1 and types.count("run.resumed") == 1
    resumed = next(e for e in events if e["type"] == "run.resumed")
    assert resumed["data"]["step"] == latest
    assert [e["data"]["attempt"] for e in events if e["type"] == "run.started"] == [1, 2]


def published_at(settings, run_id: str):
    with session_scope(settings.resolved_database_url) as session:
        return session.get(Run, run_id).dispatched_at


def test_run_submitted_while_the_broker_is_down_is_published_when_it_is_back(tmp_path):
    port = free_port()
    settings = make_settings(tmp_path / "outage", broker_url=f"redis://127.0.0.1:{port}/0",
                             reaper_interval_s=0, **CLUSTER_SECRETS)
    cli(settings, "db", "upgrade")
    key = cli(settings, "api-key", "create", "--project", "outage")
    from fastapi.testclient import TestClient

    from service.main import create_app

    with TestClient(create_app(settings), headers=auth(key)) as api:
        rows = write_jsonl(tmp_path / "t.jsonl", copy_rows(4)).read_bytes()
        file_id = api.post("/v1/files", files={"file": ("t.jsonl", rows)}).json()["id"]
        created = api.post("/v1/runs", json=spec("/models/unused", file_id))  # no broker yet
        assert created.status_code == 201
        run_id = created.json()["id"]
        assert published_at(settings, run_id) is None
        assert reap_runs(settings, publish_grace=timedelta(0)) == []  # still down: stays queued

        redis = start_redis(port, tmp_path)
        try:
            assert reap_runs(settings, publish_grace=timedelta(0)) == [run_id]
            assert api.get(f"/v1/runs/{run_id}").json()["status"] == "queued"
            assert published_at(settings, run_id) is not None
            import redis as redis_client

            assert redis_client.Redis(port=port).llen("default") == 1  # the task is waiting
        finally:
            redis.terminate()
            redis.wait(timeout=10)
