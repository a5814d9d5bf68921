"""Faults with real processes: a worker SIGKILLed in the middle of a run; the broker missing at
submit time. The API's reaper requeues what no worker will finish; runs lose nothing."""

import os
import signal
from contextlib import ExitStack
from datetime import timedelta

import pytest

from service.db import session_scope
from service.models import Run
from service.runs.reaper import reap_runs

from conftest import CLUSTER, backend_settings
from factories import (
    STACK_RUN,
    WORKER_S,
    auth,
    copy_rows,
    run_spec,
    upload,
    wait_for_run,
    wait_until,
)
from services import cli, closed_port, stack_project, stack_settings, start_redis, start_stack

pytestmark = pytest.mark.slow

STEPS = 120  # the kill comes after the first checkpoint (step 10): 110 steps of margin


@pytest.mark.both_backends
def test_worker_killed_mid_run_resumes_on_a_new_worker(tmp_path, tiny_model_dir, request, backend):
    settings = stack_settings(
        tmp_path / "faults",
        lease_seconds=3.0,
        reaper_interval_s=1.0,
        **backend_settings(request, backend),
    )
    cli(settings, "db", "upgrade")
    stack = start_stack(settings, settings.resolved_data_dir / "logs")
    try:
        http, file_id = stack_project(stack, "faults")
        body = run_spec(
            tiny_model_dir,
            file_id,
            STACK_RUN,
            training={"steps": STEPS},
            checkpoint={"every_steps": 10, "keep_last": None},
        )
        run_id = http.post("/v1/runs", json=body).json()["id"]
        wait_until(
            lambda: http.get(f"/v1/runs/{run_id}/checkpoints").json()["data"],
            WORKER_S,
            "a checkpoint before the kill",
        )

        worker = stack.procs["worker"]
        os.killpg(worker.pid, signal.SIGKILL)  # the worker and its pool child, no clean-up
        worker.wait()
        at_kill = http.get(f"/v1/runs/{run_id}").json()
        assert at_kill["status"] == "running" and at_kill["step"] < STEPS
        latest = max(c["step"] for c in http.get(f"/v1/runs/{run_id}/checkpoints").json()["data"])

        stack.start_worker()
        run = wait_for_run(http, run_id, {"succeeded", "failed", "cancelled"}, timeout=300)
        assert run["status"] == "succeeded", run["error"]
        metrics = http.get(f"/v1/runs/{run_id}/metrics", params={"names": "loss"}).json()
        events = http.get(f"/v1/runs/{run_id}/events", params={"limit": 1000}).json()["data"]
    finally:
        stack.stop()

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
    broker_down = ExitStack()
    port = broker_down.enter_context(closed_port())  # refused, and kept for redis meanwhile
    settings = stack_settings(
        tmp_path / "outage",
        broker_url=f"redis://127.0.0.1:{port}/0",
        reaper_interval_s=0,
        **CLUSTER,
    )
    cli(settings, "db", "upgrade")
    key = cli(settings, "api-key", "create", "--project", "outage")
    from fastapi.testclient import TestClient

    from service.main import create_app

    with TestClient(create_app(settings), headers=auth(key)) as api:
        file_id = upload(api, None, copy_rows(4), filename="t.jsonl")
        created = api.post("/v1/runs", json=run_spec("org/unused", file_id, STACK_RUN))  # hub id
        assert created.status_code == 201  # no broker yet
        run_id = created.json()["id"]
        assert published_at(settings, run_id) is None
        assert reap_runs(settings, publish_grace=timedelta(0)) == []  # still down: stays queued

        broker_down.close()
        redis, _ = start_redis(tmp_path, port)
        try:
            assert reap_runs(settings, publish_grace=timedelta(0)) == [run_id]
            assert api.get(f"/v1/runs/{run_id}").json()["status"] == "queued"
            assert published_at(settings, run_id) is not None
            import redis as redis_client

            assert redis_client.Redis(port=port).llen("default") == 1  # the task is waiting
        finally:
            redis.terminate()
            redis.wait(timeout=10)
