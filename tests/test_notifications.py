"""Run notifications (notify_url) against a real receiver over loopback HTTP.

The protocol tests drive the notifier's pass (`deliver_due`) in this process; the last test goes
through the API process's own notifier thread. The receiver checks every signature with the
run's webhook secret, as a user's would.
"""

import asyncio
import json
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select, update

from gvpo_client.signing import HEADER, SignatureError, verify
from service.db import session_scope
from service.models import Project, Run, RunEvent
from service.models.base import utcnow
from service.runs.control import cancel_run
from service.runs.notify import EVENT_ID_HEADER, Outcome, claim, deliver, deliver_due, record
from workers.execute import execute_run

from conftest import CLUSTER
from factories import (
    EXACT_MATCH,
    SERVER_START_S,
    SPEC_DEFAULTS,
    assert_error,
    auth,
    copy_rows,
    run_spec,
    submit,
    upload,
    wait_until,
)
from services import ThreadServer, closed_port

SECRET = "whsec_notify-tests-0123456789"


@dataclass
class Receiver:
    secret: str = SECRET
    answers: list[int] = field(default_factory=list)  # statuses of the first posts; then 200
    delay_s: float = 0.0
    deliveries: list[dict] = field(default_factory=list)  # every POST that was signed right
    bad_signatures: int = 0
    redirected_to: int = 0


class ReceiverServer(ThreadServer):
    def __init__(self, receiver: Receiver) -> None:
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> Response:
            body = await request.body()
            try:
                verify(receiver.secret, request.headers.get(HEADER), body)
            except SignatureError as exc:
                receiver.bad_signatures += 1
                return JSONResponse({"error": str(exc)}, status_code=401)
            receiver.deliveries.append({"body": json.loads(body), "headers": request.headers})
            # a slow receiver, as the test asks for (the behaviour under test, not a wait)
            await asyncio.sleep(receiver.delay_s)
            status = receiver.answers.pop(0) if receiver.answers else 200
            headers = {"Location": "/elsewhere"} if 300 <= status < 400 else {}
            return JSONResponse({"status": status}, status_code=status, headers=headers)

        @app.post("/elsewhere")
        async def elsewhere() -> dict:
            receiver.redirected_to += 1
            return {}

        super().__init__(app)
        self.receiver = receiver

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@pytest.fixture
def nsettings(settings):
    return settings.model_copy(
        update={"webhook_allow_private": True, "notify_backoff_s": 0.05, "notify_timeout_s": 5.0}
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def db_settings(request, nsettings):
    """The claim is a compare-and-set UPDATE: checked on both databases the service runs on."""
    if request.param == "sqlite":
        return nsettings
    from service.migrate import upgrade

    url = request.getfixturevalue("postgres").url
    upgrade(url)
    return nsettings.model_copy(update={"database_url": url, **CLUSTER})


def new_run(settings, model_dir, url: str, **overrides) -> str:
    return submit(settings, model_dir, notify_url=url, webhook_secret=SECRET, **overrides)


def cancel(settings, run_id: str) -> None:
    with session_scope(settings.resolved_database_url) as session:
        project = session.get(Project, session.get(Run, run_id).project_id)
        cancel_run(session, project, run_id)


def load(settings, run_id: str) -> tuple[Run, list[RunEvent]]:
    with session_scope(settings.resolved_database_url) as session:
        events = session.scalars(
            select(RunEvent).where(RunEvent.run_id == run_id, RunEvent.type.like("notify.%"))
        )
        return session.get(Run, run_id), list(events)


def pump(settings, run_id: str, state: str) -> None:
    """Run notifier passes until the run's notification is `state`."""

    def passed() -> bool:
        if load(settings, run_id)[0].notify_state == state:
            return True
        deliver_due(settings)
        return False

    wait_until(passed, SERVER_START_S, f"the notification to become {state}", every=0.02)


def assert_payload(delivery: dict, run: Run, type_: str) -> None:
    body, headers = delivery["body"], delivery["headers"]
    event_id = f"ntf_{run.id.removeprefix('run_')}"
    assert headers[EVENT_ID_HEADER] == event_id and headers["content-type"] == "application/json"
    assert set(body) == {"type", "id", "run_id", "created_at", "run"}
    assert (body["type"], body["id"], body["run_id"]) == (type_, event_id, run.id)
    assert datetime.fromisoformat(body["created_at"]) == run.finished_at
    summary = dict(body["run"])
    for name in ("started_at", "finished_at"):
        value = summary.pop(name)
        assert (value and datetime.fromisoformat(value)) == getattr(run, name)
    assert summary == {
        "id": run.id,
        "name": run.name,
        "status": run.status,
        "step": run.step,
        "total_steps": run.total_steps,
        "error": run.error,
    }


def test_a_succeeded_run_is_notified_once(nsettings, tiny_model_dir):
    receiver = Receiver()
    with ReceiverServer(receiver) as server:
        run_id = new_run(nsettings, tiny_model_dir, server.url)
        assert deliver_due(nsettings) == {}  # queued: nothing to send yet
        assert execute_run(nsettings, run_id, "worker-a") == "succeeded"
        assert deliver_due(nsettings) == {run_id: "delivered"}
        assert deliver_due(nsettings) == {}
    run, events = load(nsettings, run_id)
    assert len(receiver.deliveries) == 1 and receiver.bad_signatures == 0
    assert_payload(receiver.deliveries[0], run, "run.succeeded")
    assert run.step == 6 and run.notify_attempts == 1
    assert [(e.type, e.level) for e in events] == [("notify.delivered", "info")]
    assert events[0].data == {
        "url": server.url,
        "status": 200,
        "attempts": 1,
        "event_id": f"ntf_{run_id.removeprefix('run_')}",
    }


def test_cancelled_and_failed_runs_are_notified(nsettings, tiny_model_dir):
    receiver = Receiver()
    with ReceiverServer(receiver) as server, closed_port() as port:
        dead = f"http://127.0.0.1:{port}/score"  # nothing listens: the run fails at step 1
        cancelled = new_run(nsettings, tiny_model_dir, server.url)
        failed = new_run(
            nsettings,
            tiny_model_dir,
            server.url,
            reward={"type": "webhook", "url": dead, "timeout_s": 5, "max_attempts": 1},
        )
        quiet = submit(nsettings, tiny_model_dir)  # no notify_url: nothing is ever sent
        cancel(nsettings, cancelled)
        cancel(nsettings, quiet)
        assert execute_run(nsettings, failed, "worker-a") == "failed"
        assert deliver_due(nsettings) == {cancelled: "delivered", failed: "delivered"}
    assert load(nsettings, quiet)[0].notify_state is None
    by_run = {d["body"]["run_id"]: d for d in receiver.deliveries}
    assert len(receiver.deliveries) == 2 == len(by_run)
    run, _ = load(nsettings, cancelled)
    assert_payload(by_run[cancelled], run, "run.cancelled")
    assert by_run[cancelled]["body"]["run"]["started_at"] is None
    run, _ = load(nsettings, failed)
    assert_payload(by_run[failed], run, "run.failed")
    assert dead in by_run[failed]["body"]["run"]["error"]


def come_due(settings, run_id: str) -> None:
    """The notification's backoff ends now."""
    with session_scope(settings.resolved_database_url) as session:
        session.execute(update(Run).where(Run.id == run_id).values(notify_due_at=utcnow()))


def test_5xx_answers_are_retried_with_backoff(nsettings, tiny_model_dir):
    # Backoffs long enough that no retry comes due by itself however slow the machine: each
    # one is checked, then ended by moving the due time to now.
    settings = nsettings.model_copy(update={"notify_backoff_s": 30.0})
    receiver = Receiver(answers=[500, 503])
    with ReceiverServer(receiver) as server:
        run_id = new_run(settings, tiny_model_dir, server.url)
        cancel(settings, run_id)
        for backoff in (timedelta(seconds=30), timedelta(seconds=60)):  # 1, 2, ... x 30 s
            tried = utcnow()
            assert deliver_due(settings) == {run_id: "pending"}
            due = load(settings, run_id)[0].notify_due_at
            assert backoff <= due - tried < backoff + timedelta(seconds=30)
            assert deliver_due(settings) == {}  # backing off
            come_due(settings, run_id)
        assert deliver_due(settings) == {run_id: "delivered"}
    run, events = load(settings, run_id)
    assert len(receiver.deliveries) == 3
    assert len({json.dumps(d["body"]) for d in receiver.deliveries}) == 1  # the same event
    assert run.notify_attempts == 3 and run.notify_due_at is None
    assert [(e.type, e.data["attempts"], e.data["status"]) for e in events] == [
        ("notify.delivered", 3, 200)
    ]


def test_a_receiver_that_stays_down_gets_a_failed_event_and_nothing_more(nsettings, tiny_model_dir):
    settings = nsettings.model_copy(update={"notify_max_attempts": 3, "notify_backoff_s": 0.01})
    receiver = Receiver(answers=[500] * 10)
    with ReceiverServer(receiver) as server:
        run_id = new_run(settings, tiny_model_dir, server.url)
        cancel(settings, run_id)
        pump(settings, run_id, "failed")
        assert load(settings, run_id)[0].notify_due_at is None  # no try is due, now or later
        assert deliver_due(settings) == {}
    assert len(receiver.deliveries) == 3
    run, events = load(settings, run_id)
    assert run.notify_attempts == 3
    assert [(e.type, e.level) for e in events] == [("notify.failed", "warning")]
    message = events[0].message
    assert server.url in message and "HTTP 500" in message and "3 tries" in message


@pytest.mark.parametrize(
    ("status", "needle"), [(404, "HTTP 404"), (302, "redirects are not followed")]
)
def test_other_answers_are_final_at_once(nsettings, tiny_model_dir, status, needle):
    receiver = Receiver(answers=[status])
    with ReceiverServer(receiver) as server:
        run_id = new_run(nsettings, tiny_model_dir, server.url)
        cancel(nsettings, run_id)
        assert deliver_due(nsettings) == {run_id: "failed"}
    _, events = load(nsettings, run_id)
    assert len(receiver.deliveries) == 1 and receiver.redirected_to == 0
    assert [e.type for e in events] == ["notify.failed"] and needle in events[0].message


def test_a_dead_receiver_is_retried_then_given_up(nsettings, tiny_model_dir):
    settings = nsettings.model_copy(update={"notify_max_attempts": 2, "notify_backoff_s": 0.01})
    with closed_port() as port:  # nothing listens there
        run_id = new_run(settings, tiny_model_dir, f"http://127.0.0.1:{port}/hook")
        cancel(settings, run_id)
        pump(settings, run_id, "failed")
    _, events = load(settings, run_id)
    assert [e.type for e in events] == ["notify.failed"]
    assert "ConnectError" in events[0].message and "2 tries" in events[0].message


def test_racing_notifiers_deliver_once(db_settings, tiny_model_dir):
    receiver = Receiver(delay_s=0.3)  # the sends would overlap if both claimed the run
    with ReceiverServer(receiver) as server:
        run_id = new_run(db_settings, tiny_model_dir, server.url)
        cancel(db_settings, run_id)
        start, results = threading.Barrier(4), []

        def notifier() -> None:
            start.wait()
            results.append(deliver_due(db_settings))

        threads = [threading.Thread(target=notifier) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(results, key=len) == [{}, {}, {}, {run_id: "delivered"}]
    assert len(receiver.deliveries) == 1
    assert [e.type for e in load(db_settings, run_id)[1]] == ["notify.delivered"]


def test_a_sender_that_dies_mid_send_is_taken_over_when_its_claim_expires(
    db_settings, tiny_model_dir
):
    receiver = Receiver()
    with ReceiverServer(receiver) as server:
        run_id = new_run(db_settings, tiny_model_dir, server.url)
        cancel(db_settings, run_id)
        lost = claim(db_settings, run_id)  # this sender dies before it records anything
        assert lost is not None and deliver(db_settings, run_id) is None  # claimed: not due
        with session_scope(db_settings.resolved_database_url) as session:  # the claim expires
            session.execute(
                update(Run)
                .where(Run.id == run_id)
                .values(notify_due_at=lost.until.replace(year=2000))
            )
        assert deliver(db_settings, run_id) == "delivered"
    # The dead sender's late outcome no longer counts: its claim is gone.
    assert record(db_settings, lost, Outcome("delivered", "HTTP 200", 200)) is None
    assert len(receiver.deliveries) == 1
    assert [e.type for e in load(db_settings, run_id)[1]] == ["notify.delivered"]


def _create(api, key: str, model_dir, **extra):
    train_file = upload(api, key, copy_rows(4), filename="t.jsonl")
    body = run_spec(model_dir, train_file, SPEC_DEFAULTS, reward=EXACT_MATCH, **extra)
    return api.post("/v1/runs", headers=auth(key), json=body)


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("ftp://example.org/x", "not an http(s) URL"),
        ("https://token@example.org/hook", "credentials"),
        ("http://10.1.2.3/hook", "private"),
        ("http://127.0.0.1:9/hook", "loopback"),
    ],
)
def test_a_bad_notify_url_is_a_422_naming_it(api, make_key, tiny_model_dir, url, needle):
    error = assert_error(
        _create(api, make_key(), tiny_model_dir, notify_url=url), 422, "invalid_request"
    )
    assert [f["field"] for f in error["details"]["fields"]] == ["notify_url"]
    assert needle in error["details"]["fields"][0]["message"]


def test_the_api_process_notifies_a_run_cancelled_over_http(settings, make_key, tiny_model_dir):
    from fastapi.testclient import TestClient

    from service.main import create_app

    live = settings.model_copy(
        update={"webhook_allow_private": True, "notify_interval_s": 0.1, "reaper_interval_s": 60}
    )
    receiver = Receiver(secret="")
    key = make_key()
    with ReceiverServer(receiver) as server, TestClient(create_app(live)) as api:
        created = _create(api, key, tiny_model_dir, notify_url=server.url)
        assert created.status_code == 201, created.text
        run_id, receiver.secret = created.json()["id"], created.json()["webhook_secret"]
        assert api.post(f"/v1/runs/{run_id}/cancel", headers=auth(key)).status_code == 200
        wait_until(
            lambda: receiver.deliveries,
            SERVER_START_S,
            "the API's notifier to send the notification",
        )
        body = receiver.deliveries[0]["body"]
        assert (body["type"], body["run_id"]) == ("run.cancelled", run_id)
        events = wait_until(
            lambda: [
                e
                for e in api.get(f"/v1/runs/{run_id}/events", headers=auth(key)).json()["data"]
                if e["type"] == "notify.delivered"
            ],
            SERVER_START_S,
            "a notify.delivered event",
        )
    assert events[0]["data"]["attempts"] == 1 and len(receiver.deliveries) == 1
