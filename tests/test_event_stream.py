"""GET /v1/runs/{id}/events/stream: Server-Sent Events, live, resumable with Last-Event-ID,
ending with the run."""

import json
import threading
import time

import httpx
import pytest

from service.db import session_scope
from service.main import create_app
from service.models import Project, Run
from workers.records import RunRecorder

from factories import SERVER_START_S, auth, submit, wait_until
from services import serve_api

pytestmark = pytest.mark.both_backends


def parse(text: str) -> list[dict]:
    """SSE messages (comments skipped) as {"id", "event", "data"}."""
    messages = []
    for block in text.strip().split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if not line.startswith(":")
        )
        if fields:
            messages.append(
                {
                    "id": int(fields["id"]),
                    "event": fields["event"],
                    "data": json.loads(fields["data"]),
                }
            )
    return messages


def key_for(settings, run_id: str) -> str:
    from service.auth.service import create_api_key

    with session_scope(settings.resolved_database_url) as session:
        project = session.get(Project, session.get(Run, run_id).project_id)
        return create_api_key(session, project.name, settings.api_key_pepper)[1]


def test_stream_delivers_live_events_resumes_and_ends_with_the_run(settings, tiny_model_dir):
    run_id = submit(settings, tiny_model_dir)
    key = key_for(settings, run_id)
    recorder = RunRecorder(settings, run_id, "worker-a")
    with (
        serve_api(settings, reaper_interval_s=0) as live,
        httpx.Client(
            base_url=f"http://127.0.0.1:{live.api_port}", headers=auth(key), timeout=30
        ) as http,
    ):
        received: list[str] = []  # the stream's text so far
        failed: list[BaseException] = []

        def delivered(event: str, times: int = 1) -> None:
            wait_until(
                lambda: "".join(received).count(f"event: {event}\n") >= times,
                SERVER_START_S,
                f"the client to receive {event} x{times}",
            )

        def worker() -> None:  # each event recorded once the client has the one before it
            try:
                delivered("run.queued")  # the client is listening
                recorder.claim()
                delivered("run.started")
                for step in (1, 2):
                    recorder.event("note", f"step {step} done")
                    delivered("note", step)
            except BaseException as exc:  # noqa: BLE001 - raised again by the test
                failed.append(exc)
            finally:
                recorder.finish("succeeded", "done")  # ends the stream in any case

        threading.Thread(target=worker).start()
        started = time.monotonic()
        with http.stream("GET", f"/v1/runs/{run_id}/events/stream") as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            for text in resp.iter_text():  # ends once the run has ended
                received.append(text)
        if failed:
            raise failed[0]
        body = "".join(received)
        assert time.monotonic() - started < 20
        messages = parse(body)
        assert [m["event"] for m in messages] == [
            "run.queued",
            "run.started",
            "note",
            "note",
            "run.succeeded",
        ]
        assert [m["data"]["id"] for m in messages] == [m["id"] for m in messages]

        resumed = http.get(
            f"/v1/runs/{run_id}/events/stream", headers={"Last-Event-ID": str(messages[2]["id"])}
        )
        assert [m["event"] for m in parse(resumed.text)] == ["note", "run.succeeded"]
        assert (
            parse(
                http.get(
                    f"/v1/runs/{run_id}/events/stream", params={"after": messages[-1]["id"]}
                ).text
            )
            == []
        )


def test_stream_of_another_projects_run_is_404(settings, tiny_model_dir, make_key):
    from fastapi.testclient import TestClient

    run_id = submit(settings, tiny_model_dir)
    with TestClient(create_app(settings.model_copy(update={"reaper_interval_s": 0}))) as api:
        resp = api.get(f"/v1/runs/{run_id}/events/stream", headers=auth(make_key("other")))
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
        bad = api.get(
            f"/v1/runs/{run_id}/events/stream",
            headers={**auth(key_for(settings, run_id)), "Last-Event-ID": "x"},
        )
        assert bad.status_code == 422
