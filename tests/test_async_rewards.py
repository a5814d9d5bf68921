"""Async reward callbacks: a reward model that answers 202 and POSTs rewards to the real API,
bad callbacks refused without changing anything, and webhook secret rotation."""

import json
import math
import time

import pytest
from sqlalchemy import select

from gvpo_client.signing import HEADER, sign
from service.contract.limits import MAX_CREDENTIAL, MAX_ID, MAX_ITEMS_PER_REQUEST, MAX_WEBHOOK_ID
from service.db import session_scope
from service.main import create_app
from service.models import RewardRequest, Run, RunEvent, Sample
from workers.execute import execute_run
from workers.records import RunRecorder

from factories import (
    EXACT_MATCH,
    SPEC_DEFAULTS,
    WORKER_S,
    assert_error,
    auth,
    copy_rows,
    run_spec,
    submit,
    upload,
    webhook_secret,
)
from reward_server import Behaviour, RewardServer
from services import serve_api

pytestmark = pytest.mark.both_backends


@pytest.fixture
def api_server(settings):
    """The real API on a loopback port, where reward models call back; its settings."""
    with serve_api(settings, webhook_allow_private=True) as live:
        yield live


def async_run(settings, model_dir, url: str, **reward) -> tuple[str, str]:
    spec = {"type": "webhook", "url": url, "mode": "async", "timeout_s": 10, **reward}
    run_id = submit(settings, model_dir, reward=spec)
    return run_id, webhook_secret(settings, run_id)


def loaded_to_failed_s(settings, run_id: str) -> float:
    """Seconds from the run's model being loaded to its failure, by its events: its first
    step, whose reward phase failed it, without the model's loading (which a busy machine
    slows down as much as it likes)."""
    with session_scope(settings.resolved_database_url) as session:
        at = dict(
            session.execute(
                select(RunEvent.type, RunEvent.created_at).where(
                    RunEvent.run_id == run_id, RunEvent.type.in_(["run.model_loaded", "run.failed"])
                )
            ).all()
        )
    return (at["run.failed"] - at["run.model_loaded"]).total_seconds()


def test_async_callbacks_train_to_success(api_server, tiny_model_dir):
    behaviour = Behaviour(mode="async")
    with RewardServer(behaviour) as server:
        run_id, behaviour.secret = async_run(
            api_server, tiny_model_dir, server.url, max_items_per_request=5
        )
        assert execute_run(api_server, run_id, "worker-a") == "succeeded"
    assert behaviour.callback_statuses and set(behaviour.callback_statuses) == {200}
    with session_scope(api_server.resolved_database_url) as session:
        samples = session.scalars(select(Sample).where(Sample.run_id == run_id)).all()
        requests = session.scalars(
            select(RewardRequest).where(RewardRequest.run_id == run_id)
        ).all()
    assert len(samples) == 48 and len(requests) == 6 * 2  # 8 items a step, 5 per request
    assert all(r.completed_at is not None for r in requests)
    with session_scope(api_server.resolved_database_url) as session:
        types = session.scalars(select(RunEvent.type).where(RunEvent.run_id == run_id)).all()
    assert "reward.retry" not in types  # every callback landed on the first send
    for s in samples:
        sid = f"smp_{run_id.removeprefix('run_')}_{s.step}_{s.group_index}_{s.sample_index}"
        assert s.reward == pytest.approx(behaviour.rewards[sid])


def test_a_missing_callback_is_resent_then_fails_the_run(api_server, tiny_model_dir):
    behaviour = Behaviour(mode="async", call_back=False)
    with RewardServer(behaviour) as server:
        run_id, behaviour.secret = async_run(
            api_server, tiny_model_dir, server.url, timeout_s=0.5, max_attempts=2
        )
        assert execute_run(api_server, run_id, "worker-a") == "failed"
    assert loaded_to_failed_s(api_server, run_id) < 30  # 2 x 0.5 s, far from the 5 x 10 s default
    assert behaviour.calls == 2  # sent, then re-sent once after the deadline
    with session_scope(api_server.resolved_database_url) as session:
        run = session.get(Run, run_id)
        types = session.scalars(select(RunEvent.type).where(RunEvent.run_id == run_id)).all()
    assert "no complete callback" in run.error and "after 2 tries" in run.error
    assert types.count("reward.retry") == 1


# Longer than a loaded machine takes for the tiny model's other phases (a rollout that ran past
# it would fail the run naming the rollout), far shorter than the reward model's 20 x 2 s.
STEP_TIMEOUT_S = 10.0


def hung_reward_run(settings, model_dir, server: RewardServer) -> str:
    """A run whose reward model never calls back (it would be re-sent 20 x 2 s) under a
    STEP_TIMEOUT_S step timeout."""
    run_id, server.behaviour.secret = async_run(
        settings, model_dir, server.url, timeout_s=2, max_attempts=20
    )
    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
        run.spec = {**run.spec, "resources": {"step_timeout_s": STEP_TIMEOUT_S}}
    return run_id


def failure_of(settings, run_id) -> tuple[Run, RunEvent]:
    """The run and its last event."""
    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
        last = session.scalars(
            select(RunEvent).where(RunEvent.run_id == run_id).order_by(RunEvent.id.desc())
        ).first()
    return run, last


@pytest.mark.one_backend("sqlite")  # the watchdog's, not the database's
def test_a_reward_phase_past_the_step_timeout_fails_the_run_naming_it(api_server, tiny_model_dir):
    """The watchdog: the reward model never calls back and would be re-sent for a minute; the
    run fails after step_timeout_s instead, and the event names the phase that hung."""
    with RewardServer(Behaviour(mode="async", call_back=False)) as server:
        run_id = hung_reward_run(api_server, tiny_model_dir, server)
        assert execute_run(api_server, run_id, "worker-a") == "failed"
    # the limit and a heartbeat or two, not the 20 x 2 s of re-sends
    assert loaded_to_failed_s(api_server, run_id) < STEP_TIMEOUT_S + 10
    run, failed = failure_of(api_server, run_id)
    assert run.status == "failed" and "reward phase" in run.error and "step 1" in run.error
    assert failed.type == "run.failed" and failed.data == {"phase": "reward", "step": 1}


@pytest.mark.one_backend("sqlite")  # the watchdog's, not the database's
def test_a_hung_phase_that_cannot_be_interrupted_ends_the_process(api_server, tiny_model_dir):
    """The watchdog's last resort: off the main thread there is no interrupt, so it records the
    failure and ends the worker process (Celery starts a fresh one)."""
    import subprocess
    import sys

    from service.stack import stack_env

    with RewardServer(Behaviour(mode="async", call_back=False)) as server:
        run_id = hung_reward_run(api_server, tiny_model_dir, server)
        code = (
            "import sys, threading; from service.config import Settings; "
            "from workers.execute import execute_run; "
            "s = Settings(webhook_allow_private=True, heartbeat_seconds=0.5); "
            "t = threading.Thread(target=execute_run, args=(s, sys.argv[1], 'w')); "
            "t.start(); t.join(); sys.exit(3)"
        )  # 3: the run returned, nobody ended it
        child = subprocess.run(
            [sys.executable, "-c", code, run_id],
            env={**stack_env(api_server), "OMP_NUM_THREADS": "1"},
            timeout=WORKER_S,
        )
    assert child.returncode == 1  # os._exit(1) from the watchdog
    run, failed = failure_of(api_server, run_id)
    assert run.status == "failed" and "reward phase" in run.error
    assert failed.data == {"phase": "reward", "step": 1}


# --- the callback endpoint, request by request --------------------------------------------------


def test_concurrent_partial_callbacks_lose_no_reward(api_server, tiny_model_dir):
    """Reward models answer sample by sample, in parallel: every accepted reward must be kept
    (a read-merge-write that two callbacks interleave would drop one of them)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    run_id = submit(api_server, tiny_model_dir)
    recorder = RunRecorder(api_server, run_id, "worker-a")
    secret = webhook_secret(api_server, run_id)
    requests = {f"rq_{n}": [f"smp_{n}_{i}" for i in range(8)] for n in range(25)}
    for request_id, sample_ids in requests.items():
        recorder.open_reward_request(request_id, 1, sample_ids)

    def call_back(item: tuple[str, str]) -> int:
        request_id, sample_id = item
        body = json.dumps(
            {"request_id": request_id, "rewards": [{"sample_id": sample_id, "reward": 0.5}]}
        ).encode()
        resp = client.post(
            f"/v1/runs/{run_id}/rewards",
            content=body,
            headers={"Content-Type": "application/json", HEADER: sign(secret, body)},
        )
        return resp.json()["accepted"] if resp.status_code == 200 else resp.status_code

    items = [(r, s) for r, sids in requests.items() for s in sids]
    with (
        httpx.Client(base_url=f"http://127.0.0.1:{api_server.api_port}", timeout=60) as client,
        ThreadPoolExecutor(16) as pool,
    ):
        answers = list(pool.map(call_back, items))
    assert answers == [1] * len(items)
    with session_scope(api_server.resolved_database_url) as session:
        stored = session.scalars(select(RewardRequest).where(RewardRequest.run_id == run_id)).all()
    assert sorted(len(r.rewards) for r in stored) == [8] * 25
    assert all(r.completed_at is not None for r in stored)


def test_conflicting_callbacks_racing_for_one_reward_store_exactly_one(api_server, tiny_model_dir):
    """Callbacks that disagree about one sample, sent at once: exactly one value is stored;
    every other callback gets a 200 (it repeated the stored value) or a 409, never a 500."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    run_id = submit(api_server, tiny_model_dir)
    RunRecorder(api_server, run_id, "worker-a").open_reward_request("rq_race", 1, ["smp_x"])
    secret = webhook_secret(api_server, run_id)
    values = [0.5] * 8 + [round(0.1 * n, 1) for n in range(8)]  # 0.5 appears 9 times

    def call_back(value: float) -> tuple[int, int | None]:
        body = json.dumps(
            {"request_id": "rq_race", "rewards": [{"sample_id": "smp_x", "reward": value}]}
        ).encode()
        resp = client.post(
            f"/v1/runs/{run_id}/rewards",
            content=body,
            headers={"Content-Type": "application/json", HEADER: sign(secret, body)},
        )
        return resp.status_code, resp.json().get("accepted")

    with (
        httpx.Client(base_url=f"http://127.0.0.1:{api_server.api_port}", timeout=60) as client,
        ThreadPoolExecutor(16) as pool,
    ):
        answers = list(pool.map(call_back, values))
    with session_scope(api_server.resolved_database_url) as session:
        stored = session.get(RewardRequest, "rq_race").rewards["smp_x"]
    assert [a for a in answers if a == (200, 1)] == [(200, 1)]  # one winner
    for value, (status, accepted) in zip(values, answers, strict=True):
        if value == stored:
            assert status == 200 and accepted in (0, 1)
        else:
            assert (status, accepted) == (409, None)


def test_callback_over_the_size_limit_is_413_before_it_is_read(settings, tiny_model_dir):
    from fastapi.testclient import TestClient

    run_id = submit(settings, tiny_model_dir)
    secret = webhook_secret(settings, run_id)
    small = settings.model_copy(update={"max_callback_bytes": 2000, "reaper_interval_s": 0})
    items = [{"sample_id": f"smp_{i}", "reward": 0.5} for i in range(100)]
    body = json.dumps({"request_id": "rq_1", "rewards": items}).encode()
    with TestClient(create_app(small)) as api:
        resp = api.post(
            f"/v1/runs/{run_id}/rewards",
            content=body,
            headers={"Content-Type": "application/json", HEADER: sign(secret, body)},
        )
        assert_error(resp, 413, "payload_too_large", "2000-byte limit")
        chunks = api.post(
            f"/v1/runs/{run_id}/rewards",
            content=iter([body[:1500], body[1500:]]),
            headers={HEADER: sign(secret, body)},
        )  # no Content-Length: streamed
        assert_error(chunks, 413, "payload_too_large")


@pytest.fixture
def pending(settings, tiny_model_dir):
    """A run with one open async request of two samples."""
    run_id = submit(settings, tiny_model_dir)
    RunRecorder(settings, run_id, "worker-a").open_reward_request("rq_1", 1, ["smp_a", "smp_b"])
    return run_id, webhook_secret(settings, run_id)


def post(
    api,
    run_id: str,
    secret: str,
    rewards: list[dict],
    request_id: str = "rq_1",
    timestamp: int | None = None,
    raw: bytes | None = None,
):
    body = (
        raw
        if raw is not None
        else json.dumps({"request_id": request_id, "rewards": rewards}).encode()
    )
    return api.post(
        f"/v1/runs/{run_id}/rewards",
        content=body,
        headers={"Content-Type": "application/json", HEADER: sign(secret, body, timestamp)},
    )


def stored(settings) -> dict:
    with session_scope(settings.resolved_database_url) as session:
        return dict(session.get(RewardRequest, "rq_1").rewards)


def test_callbacks_merge_and_duplicates_are_accepted_once(api, settings, pending):
    run_id, secret = pending
    first = post(api, run_id, secret, [{"sample_id": "smp_a", "reward": 0.5}])
    assert first.status_code == 200 and first.json()["accepted"] == 1
    assert not first.json()["complete"]
    again = post(api, run_id, secret, [{"sample_id": "smp_a", "reward": 0.5}])
    assert again.status_code == 200 and again.json()["accepted"] == 0
    done = post(
        api,
        run_id,
        secret,
        [{"sample_id": "smp_a", "reward": 0.5}, {"sample_id": "smp_b", "reward": 1}],
    )
    assert done.json() == {
        "object": "reward.callback",
        "request_id": "rq_1",
        "accepted": 1,
        "complete": True,
    }
    assert stored(settings) == {"smp_a": 0.5, "smp_b": 1.0}


@pytest.mark.parametrize(
    ("case", "status", "needle"),
    [
        ("wrong_secret", 401, "does not match"),
        ("stale", 401, "tolerance"),
        ("unsigned", 401, "missing GVPO-Signature"),
        ("unknown_request", 400, "unknown request_id"),
        ("unknown_sample", 400, "unknown sample_id"),
        ("nan", 400, "finite"),
        ("reward_past_any_float", 400, "finite"),
        ("more_rewards_than_a_request_has", 400, "at most a request's items"),
        ("request_id_longer_than_any", 400, "request_id is longer"),
        ("not_json", 400, "not JSON"),
        ("deep_json", 400, "nests too deeply"),
        ("huge_number", 400, "not JSON"),
        ("odd_stamp", 401, "malformed"),
        ("long_stamp", 401, "malformed"),
        ("non_hex_signature", 401, "malformed"),
        ("conflict", 409, "already has reward 0.5"),
        # Values that only the database refuses (PostgreSQL's text holds no NUL, and no text
        # holds half a surrogate pair): a 400 naming the value, on either database's path.
        ("nul_in_request_id", 400, "request"),
        ("lone_surrogate_in_request_id", 400, "not JSON"),
    ],
)
def test_bad_callbacks_are_refused_and_change_nothing(api, settings, pending, case, status, needle):
    run_id, secret = pending
    assert post(api, run_id, secret, [{"sample_id": "smp_a", "reward": 0.5}]).status_code == 200
    good = [{"sample_id": "smp_b", "reward": 0.25}]
    if case == "wrong_secret":
        resp = post(api, run_id, "whsec_wrong", good)
    elif case == "stale":
        resp = post(api, run_id, secret, good, timestamp=int(time.time()) - 3600)
    elif case == "unsigned":
        resp = api.post(f"/v1/runs/{run_id}/rewards", json={"request_id": "rq_1", "rewards": good})
    elif case == "unknown_request":
        resp = post(api, run_id, secret, good, request_id="rq_other")
    elif case == "unknown_sample":
        resp = post(api, run_id, secret, [{"sample_id": "smp_zzz", "reward": 1.0}])
    elif case == "nan":
        resp = post(api, run_id, secret, [{"sample_id": "smp_b", "reward": math.nan}])
    elif case == "reward_past_any_float":  # a JSON integer no float holds
        resp = post(api, run_id, secret, [{"sample_id": "smp_b", "reward": 10**400}])
    elif case == "more_rewards_than_a_request_has":
        resp = post(api, run_id, secret, good * (MAX_ITEMS_PER_REQUEST + 1))
    elif case == "request_id_longer_than_any":
        resp = post(api, run_id, secret, good, request_id="rq_" + "x" * MAX_WEBHOOK_ID)
    elif case == "nul_in_request_id":
        resp = post(api, run_id, secret, good, request_id="rq_1\u0000")
    elif case == "lone_surrogate_in_request_id":
        resp = post(api, run_id, secret, good, request_id="rq_\ud800")
    elif case == "not_json":
        resp = post(api, run_id, secret, [], raw=b"{not json")
    elif case == "deep_json":
        resp = post(api, run_id, secret, [], raw=b"[" * 100_000 + b"]" * 100_000)
    elif case == "huge_number":
        huge = b'{"request_id": "rq_1", "x": ' + b"9" * 5000 + b"}"  # past int()'s 4,300 digits
        resp = post(api, run_id, secret, [], raw=huge)
    elif case in ("odd_stamp", "long_stamp", "non_hex_signature"):
        body = json.dumps({"request_id": "rq_1", "rewards": good}).encode()
        stamp, digest = sign(secret, body).removeprefix("t=").split(",v1=")
        superscript_two, accented = "\u00b2", "\u00e9" * 64  # isdigit() but not int(); not hex
        header = {
            "odd_stamp": f"t={superscript_two},v1={digest}",
            "long_stamp": f"t={'9' * 400},v1={digest}",
            "non_hex_signature": f"t={stamp},v1={accented}",
        }[case]
        resp = api.post(
            f"/v1/runs/{run_id}/rewards",
            content=body,
            headers={"Content-Type": "application/json", HEADER: header.encode()},
        )
    else:
        resp = post(
            api,
            run_id,
            secret,
            [{"sample_id": "smp_b", "reward": 0.25}, {"sample_id": "smp_a", "reward": 0.75}],
        )
    assert_error(
        resp, status, {401: "unauthorized", 400: "bad_request", 409: "conflict"}[status], needle
    )
    assert stored(settings) == {"smp_a": 0.5}  # nothing changed, not even smp_b


def test_callback_for_an_unknown_run_is_404(api):
    body = b'{"request_id": "rq_1", "rewards": []}'
    resp = api.post("/v1/runs/run_nope/rewards", content=body, headers={HEADER: sign("x", body)})
    assert_error(resp, 404, "not_found")


@pytest.mark.parametrize(
    ("where", "field"), [("path", "run_id"), ("header", HEADER), ("both", "run_id")]
)
def test_a_callback_id_or_signature_past_its_limit_is_422_naming_it(api, pending, where, field):
    # The route reads its own parameters; they are bounded as FastAPI bounds the others'.
    run_id, secret = pending
    body = b'{"request_id": "rq_1", "rewards": []}'
    signature = sign(secret, body)
    if where in ("path", "both"):
        run_id = "run_" + "x" * MAX_ID
    if where in ("header", "both"):
        signature += "0" * MAX_CREDENTIAL
    resp = api.post(f"/v1/runs/{run_id}/rewards", content=body, headers={HEADER: signature})
    error = assert_error(resp, 422, "invalid_request", "at most")
    assert [f["field"] for f in error["details"]["fields"]] == [field]


def test_secret_rotation_keeps_the_old_secret_for_the_grace_period(
    api, settings, pending, make_key
):
    run_id, old = pending
    project_key = make_key("loop")  # the project `submit` created the run in
    rotated = api.post(f"/v1/runs/{run_id}/webhook-secret/rotate", headers=auth(project_key))
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["webhook_secret"]
    assert new != old and new.startswith("whsec_")
    assert post(api, run_id, old, [{"sample_id": "smp_a", "reward": 0.5}]).status_code == 200
    assert post(api, run_id, new, [{"sample_id": "smp_b", "reward": 0.5}]).status_code == 200
    shown = api.get(f"/v1/runs/{run_id}", headers=auth(project_key)).text
    assert new not in shown and old not in shown
    other = make_key("someone-else")
    assert_error(
        api.post(f"/v1/runs/{run_id}/webhook-secret/rotate", headers=auth(other)), 404, "not_found"
    )


def test_a_rotated_out_secret_stops_working_after_the_grace_period(settings, pending, make_key):
    from fastapi.testclient import TestClient

    run_id, old = pending
    no_grace = settings.model_copy(update={"webhook_secret_grace_s": 0})
    with TestClient(create_app(no_grace)) as api:
        new = api.post(
            f"/v1/runs/{run_id}/webhook-secret/rotate", headers=auth(make_key("loop"))
        ).json()["webhook_secret"]
        assert_error(
            post(api, run_id, old, [{"sample_id": "smp_a", "reward": 0.5}]), 401, "unauthorized"
        )
        assert post(api, run_id, new, [{"sample_id": "smp_a", "reward": 0.5}]).status_code == 200


def test_a_user_given_secret_is_used_and_never_stored_in_the_spec(
    api, settings, make_key, tiny_model_dir
):
    key = make_key()
    mine = "whsec_my_own_secret_0123456789"
    body = run_spec(
        tiny_model_dir,
        upload(api, key, copy_rows(4), filename="t.jsonl"),
        SPEC_DEFAULTS,
        reward=EXACT_MATCH,
        webhook_secret=mine,
    )
    created = api.post("/v1/runs", headers=auth(key), json=body)
    assert created.status_code == 201 and created.json()["webhook_secret"] == mine
    assert "webhook_secret" not in created.json()["spec"]
    assert mine not in api.get(f"/v1/runs/{created.json()['id']}", headers=auth(key)).text
    short = api.post("/v1/runs", headers=auth(key), json={**body, "webhook_secret": "short"})
    assert_error(short, 422, "invalid_request")
    assert short.json()["error"]["details"]["fields"][0]["field"] == "webhook_secret"
