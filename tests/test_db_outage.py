"""The database goes away (PostgreSQL stopped, then started again): the worker waits it out in
the middle of a run and the run finishes with every step recorded exactly once; the API's routes
on the event loop answer again as soon as it is back."""

from fastapi.testclient import TestClient
from run_control import execute_in_thread, wait_for_step
from sqlalchemy import func, select

from service.config import Settings
from service.db import get_engine, session_scope
from service.main import create_app
from service.migrate import upgrade
from service.models import Metric, Run

from conftest import CLUSTER
from factories import WORKER_S, assert_error, submit, wait_until

STEPS = 300


def test_worker_waits_out_a_database_outage(tmp_path, tiny_model_dir, postgres, caplog):
    settings = Settings(
        data_dir=tmp_path / "gvpo",
        database_url=postgres.url,
        heartbeat_seconds=0.5,
        lease_seconds=60,
        db_retry_s=60,
        encryption_key=CLUSTER["encryption_key"],  # PostgreSQL: a cluster's key and roots
        model_roots=CLUSTER["model_roots"],
    )
    settings.resolved_data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    run_id = submit(
        settings, tiny_model_dir, training={"steps": STEPS}, checkpoint={"every_steps": 1000}
    )
    worker, result = execute_in_thread(settings, run_id, "worker-a")
    wait_for_step(settings, run_id, 5)

    postgres.stop("immediate")  # as if the database machine died: connections drop
    # back once the worker has found it gone and tried again (it logs each wait)
    wait_until(
        lambda: sum("database unavailable" in r.getMessage() for r in caplog.records) >= 2,
        WORKER_S,
        "the worker to retry its database work twice",
    )
    postgres.start()
    worker.join(timeout=300)
    assert result["status"] == "succeeded"
    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
        per_step = session.execute(
            select(Metric.step, func.count())
            .where(Metric.run_id == run_id, Metric.name == "loss")
            .group_by(Metric.step)
        ).all()
    assert (run.status, run.step) == ("succeeded", STEPS)
    assert sorted(per_step) == [(s, 1) for s in range(1, STEPS + 1)]


def test_the_event_loop_routes_answer_again_once_the_database_is_back(tmp_path, postgres):
    # Reward callbacks (and listings) run on the API's own asyncpg pool (service.db.LoopPool),
    # whose connections the restart closes: each is replaced when next taken, and no callback
    # after the restart gets one the server closed. (Before the pool, the first one got a 500.)
    settings = Settings(
        data_dir=tmp_path / "gvpo", database_url=postgres.url, grpc_port=0, **CLUSTER
    )
    settings.resolved_data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    get_engine(settings.resolved_database_url).dispose()
    callback = {"request_id": "rq_x", "rewards": []}
    with TestClient(create_app(settings)) as client:
        # a callback reads the run and its request through the pool: none here, a 404
        resp = client.post("/v1/runs/run_missing/rewards", json=callback)
        assert_error(resp, 404, "not_found", "run_missing")
        assert client.app.state.loop_pool.pool.get_size() == 1
        postgres.stop("immediate")  # the server's processes die: every connection drops
        postgres.start()
        resp = client.post("/v1/runs/run_missing/rewards", json=callback)
        assert_error(resp, 404, "not_found", "run_missing")
