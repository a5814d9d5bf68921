"""Usage: what runs used, per day and per run, equals what the runs themselves recorded and what
their reward model saw; only the project's own; and a spec's cost estimate before submission."""

import threading
from datetime import UTC, datetime, timedelta

import pytest
from run_control import run_row, series

from service.contract.metrics import TOKENS_TOTAL
from workers.execute import execute_run
from workers.records import RunRecorder
from workers.spending import Spending

from factories import assert_error, auth, copy_rows, submit, upload, webhook_secret
from reward_server import Behaviour, RewardServer

pytestmark = pytest.mark.both_backends

STEPS = 3
COUNTED = ("tokens_generated", "tokens_trained", "reward_calls", "environment_calls")


def _run_with_webhook(settings, tiny_model_dir, server, behaviour) -> str:
    run_id = submit(
        settings,
        tiny_model_dir,
        reward={"type": "webhook", "url": server.url, "timeout_s": 10, "max_attempts": 3},
        training={"steps": STEPS, "prompts_per_step": 2},
    )
    behaviour.secret = webhook_secret(settings, run_id)
    calls_before = behaviour.calls
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    return run_id, behaviour.calls - calls_before


def test_usage_per_day_and_per_run_is_what_the_runs_recorded(
    settings, tiny_model_dir, api, make_key
):
    settings = settings.model_copy(update={"webhook_allow_private": True})
    behaviour = Behaviour(fail_first=1)  # one 503, retried: two calls for the first step
    with RewardServer(behaviour) as server:
        runs = dict(
            _run_with_webhook(settings, tiny_model_dir, server, behaviour) for _ in range(2)
        )
    assert sorted(runs.values()) == [STEPS, STEPS + 1]
    key = make_key("loop")

    by_run = api.get("/v1/usage", params={"group_by": "run"}, headers=auth(key)).json()
    rows = {row["run_id"]: row for row in by_run["data"]}
    assert set(rows) == set(runs)
    for run_id, calls in runs.items():
        row, run = rows[run_id], run_row(settings, run_id)
        assert row["tokens_generated"] == run.tokens_generated > 0
        assert row["tokens_generated"] == series(settings, run_id, TOKENS_TOTAL)[STEPS]
        # the reward server gives every group spread: each group trains, every token counts
        assert row["tokens_trained"] == row["tokens_generated"]
        assert row["reward_calls"] == calls  # as the reward model counted them, retry included
        assert row["environment_calls"] == 0
        held = (run.finished_at - run.claimed_at).total_seconds()
        assert 0 < row["cpu_seconds"] <= held + 1e-3 and row["gpu_seconds"] == 0
        # the run's own report says the same
        own = api.get(f"/v1/runs/{run_id}/usage", headers=auth(key)).json()
        assert own["attempts"] == 1 and len(own["by_day"]) == 1
        assert {k: own["total"][k] for k in COUNTED} == {k: row[k] for k in COUNTED}

    by_day = api.get("/v1/usage", headers=auth(key)).json()
    assert by_day["group_by"] == "day" and len(by_day["data"]) == 1
    (day,) = by_day["data"]
    for name in (*COUNTED, "cpu_seconds", "gpu_seconds"):
        assert day[name] == pytest.approx(sum(row[name] for row in rows.values()))
        assert by_day["total"][name] == pytest.approx(day[name])
    assert by_day["quota"]["gpu_hours_used"] == pytest.approx(day["cpu_seconds"] / 3600)
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    empty = api.get("/v1/usage", params={"until": yesterday}, headers=auth(key)).json()
    assert empty["data"] == [] and empty["total"]["tokens_generated"] == 0

    # another project sees none of it
    other = make_key("other")
    assert api.get("/v1/usage", headers=auth(other)).json()["data"] == []
    run_id = next(iter(runs))
    assert_error(api.get(f"/v1/runs/{run_id}/usage", headers=auth(other)), 404, "not_found")
    assert_error(
        api.get("/v1/usage", params={"group_by": "week"}, headers=auth(key)),
        422,
        "invalid_request",
        "group_by",
    )


def test_groups_without_spread_are_generated_but_not_trained(
    settings, tiny_model_dir, api, make_key
):
    same = {"type": "builtin", "name": "regex", "params": {"pattern": "(?!)"}}  # 0 for anything
    run_id = submit(
        settings,
        tiny_model_dir,
        reward=same,
        training={"steps": 2},
        algorithm={"skip_zero_variance": True},
    )
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    usage = api.get(f"/v1/runs/{run_id}/usage", headers=auth(make_key("loop"))).json()["total"]
    assert usage["tokens_generated"] == run_row(settings, run_id).tokens_generated > 0
    assert usage["tokens_trained"] == 0  # every group skipped, having no spread


def test_an_estimate_goes_by_the_projects_runs_of_the_same_model(
    settings, tiny_model_dir, api, make_key
):
    key = make_key("loop")
    file_id = upload(api, key, copy_rows(4))
    spec = {
        "model": {"path": str(tiny_model_dir)},
        "dataset": {"train_file": file_id},
        "reward": {"type": "builtin", "name": "exact_match"},
        "algorithm": {"group_size": 4},
        "sampling": {"max_new_tokens": 16},
        "training": {"steps": 10, "prompts_per_step": 2, "mini_batches": 1},
    }
    first = api.post("/v1/runs:estimate", json=spec, headers=auth(key))
    assert first.status_code == 200, first.text
    first = first.json()
    assert (first["completions"], first["tokens_generated_max"]) == (80, 1280)
    assert first["device_hours"] is None and "no succeeded run" in first["basis"]

    run_id = submit(settings, tiny_model_dir, training={"steps": 2, "prompts_per_step": 2})
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    then = api.post("/v1/runs:estimate", json=spec, headers=auth(key)).json()
    usage = api.get(f"/v1/runs/{run_id}/usage", headers=auth(key)).json()["total"]
    rate = usage["cpu_seconds"] / usage["tokens_generated"]
    assert then["device_hours"] == pytest.approx(rate * 1280 / 3600)
    assert then["fits_budget"] is None  # no budget

    bad = api.post("/v1/runs:estimate", json={**spec, "training": {"steps": 0}}, headers=auth(key))
    assert_error(bad, 422, "invalid_request", "training.steps")
    too_long = {**spec, "sampling": {"max_new_tokens": 1024}}  # the tiny model's context: 256
    assert_error(
        api.post("/v1/runs:estimate", json=too_long, headers=auth(key)),
        422,
        "invalid_request",
        "sampling.max_new_tokens",
    )
    theirs = api.post(
        "/v1/runs:estimate",
        json={**spec, "dataset": {"train_file": file_id}},
        headers=auth(make_key("other")),
    )
    assert_error(theirs, 422, "invalid_request", file_id)


def test_an_attempt_over_midnight_counts_its_time_on_each_day():
    since = datetime(2026, 12, 1, 23, 59, 30, tzinfo=UTC)
    spending = Spending("run_x", "proj_x", 1, "gpu", 2, since)
    spending.add(since + timedelta(seconds=10), tokens_generated=5)
    spending.add(since + timedelta(seconds=40), tokens_generated=7, reward_calls=1)
    rows = spending.rows(since + timedelta(seconds=60))
    assert [(r["day"].day, r["device_seconds"], r["tokens_generated"]) for r in rows] == [
        (1, 60.0, 5),
        (2, 60.0, 7),
    ]
    assert rows[1]["reward_calls"] == 1 and rows[0]["reward_calls"] == 0


def test_heartbeats_while_steps_are_recorded_never_deadlock(settings, tiny_model_dir):
    """The heartbeat and the step writer both write the attempt's usage rows and the run's
    row. Each must lock the run's row first: a step that wrote its usage rows before its run
    row deadlocked with a heartbeat on PostgreSQL, failing the renewal after a second's wait,
    long enough for a short lease to run out. No retries here: any failed write fails."""
    settings = settings.model_copy(update={"db_retry_s": 0.0})
    run_id = submit(settings, tiny_model_dir)
    recorder = RunRecorder(settings, run_id, "worker-a")
    assert recorder.claim()[0] is not None
    recorder.start_spending("cpu", 1)
    stop, failures, renewals = threading.Event(), [], []

    def beat() -> None:  # as workers/heartbeat.py does, without its pause between renewals
        while not stop.is_set():
            try:
                renewals.append(recorder.renew_lease())
            except Exception as exc:  # what failed is the finding
                failures.append(exc)

    heartbeat = threading.Thread(target=beat)
    heartbeat.start()
    try:
        for step in range(1, 201):
            recorder.spent(tokens_generated=10)
            recorder.record_step(step, {"loss": 1.0}, [], 10)
    finally:
        stop.set()
        heartbeat.join()
    assert not failures, failures[0]
    assert renewals and all(renewals)
