"""The database goes away in the middle of a run (PostgreSQL stopped, then started again): the
worker waits it out and the run finishes with every step recorded exactly once."""

from run_control import execute_in_thread, wait_for_step
from sqlalchemy import func, select

from service.config import Settings
from service.db import session_scope
from service.migrate import upgrade
from service.models import Metric, Run

from conftest import CLUSTER
from factories import WORKER_S, submit, wait_until

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
