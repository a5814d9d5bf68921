"""The OpenAI-compatible endpoints' own rules, in process (no vLLM): which models a project may
name, what a missing model or a missing inference worker answers, how recorded answers are
given their completion ids, and how traffic groups of completion ids are checked and stored.
tests/test_serving.py serves real models through vLLM."""

import json
import shutil
import time
from datetime import timedelta

import pytest
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from service.auth.service import revoke_api_key
from service.db import session_scope
from service.models import ApiKey, Checkpoint, Completion, InferenceWorker, Run, RunGroup
from service.models.base import utcnow
from service.serving.lookups import KEY_TTL_S
from service.serving.models import ServedModel
from service.serving.recording import Recorder

from factories import assert_error, auth, submit, wait_until
from services import ThreadServer

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
K = 4  # submit()'s group size


def chat(api, key: str, model: str, **extra):
    return api.post(
        "/v1/chat/completions", headers=auth(key), json={"model": model, **CHAT, **extra}
    )


def publish(settings, run_id: str, path, step: int = 0) -> None:
    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, run_id)
        run.weights_path, run.weights_step, run.status = str(path), step, "running"


def asked(settings, run_id: str):
    with session_scope(settings.resolved_database_url) as session:
        return session.get(Run, run_id).serving_asked_at


def checkpoint(settings, run_id: str, path, step: int = 1) -> str:
    with session_scope(settings.resolved_database_url) as session:
        ckpt = Checkpoint(id=f"ckpt_{run_id[4:]}_{step}", run_id=run_id, step=step, path=str(path))
        ckpt.bytes = 1
        session.add(ckpt)
        return ckpt.id


@pytest.mark.both_backends
def test_which_models_a_project_may_name(api, settings, make_key, tiny_model_dir, tmp_path):
    key, other = make_key("loop"), make_key("other")  # submit() makes its runs in "loop"
    run_id = submit(settings, tiny_model_dir)
    assert asked(settings, run_id) is None
    assert_error(chat(api, key, run_id), 409, "conflict", "has not started")
    assert asked(settings, run_id) is not None  # from now on it publishes its weights
    publish(settings, run_id, tiny_model_dir, step=3)
    gone_dir = tmp_path / "gone"
    shutil.copytree(tiny_model_dir, gone_dir)
    ckpt = checkpoint(settings, run_id, tiny_model_dir)
    gone = checkpoint(settings, run_id, gone_dir, step=2)
    shutil.rmtree(gone_dir)

    listed = api.get("/v1/models", headers=auth(key)).json()
    assert listed["object"] == "list"
    assert {m["id"]: m["step"] for m in listed["data"]} == {run_id: 3, ckpt: 1, gone: 2}
    assert all(m["object"] == "model" and m["run_id"] == run_id for m in listed["data"])
    assert api.get("/v1/models", headers=auth(other)).json()["data"] == []
    assert api.get(f"/v1/models/{ckpt}", headers=auth(key)).json()["id"] == ckpt

    for model in (run_id, ckpt, "ckpt_nope", "run_nope", "gpt-4o"):  # another project's too
        assert_error(chat(api, other, model), 404, "not_found", repr(model), "GET /v1/models")
    assert_error(api.get(f"/v1/models/{ckpt}", headers=auth(other)), 404, "not_found")
    assert_error(chat(api, key, gone), 410, "gone", gone, "files are gone")
    no_sync = submit(settings, tiny_model_dir, serving={"sync_every_steps": 0})
    assert_error(chat(api, key, no_sync), 409, "conflict", "sync_every_steps is 0")
    moved = submit(settings, tiny_model_dir)
    publish(settings, moved, tmp_path / "deleted")
    assert_error(chat(api, key, moved), 410, "gone", "published are gone")
    assert_error(
        api.post("/v1/chat/completions", json={"model": ckpt, **CHAT}), 401, "unauthorized"
    )
    assert asked(settings, no_sync) is None  # it never publishes: nothing to ask for

    # A run nobody asked for publishes nothing but step 0; once it has a checkpoint newer than
    # what it published, that checkpoint is its model (a finished run: its last one).
    quiet = submit(settings, tiny_model_dir)
    publish(settings, quiet, tiny_model_dir, step=0)
    assert api.get(f"/v1/models/{quiet}", headers=auth(key)).json()["step"] == 0
    checkpoint(settings, quiet, tiny_model_dir, step=4)
    assert api.get(f"/v1/models/{quiet}", headers=auth(key)).json()["step"] == 4
    listed = api.get("/v1/models", headers=auth(key)).json()["data"]
    assert {m["id"]: m["step"] for m in listed}[quiet] == 4
    checkpoint(settings, no_sync, tiny_model_dir, step=2)
    assert api.get(f"/v1/models/{no_sync}", headers=auth(key)).json()["step"] == 2


def test_bad_bodies_are_named(api, settings, make_key, tiny_model_dir):
    key = make_key("loop")
    run_id = submit(settings, tiny_model_dir)
    publish(settings, run_id, tiny_model_dir)
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert_error(
            api.post(path, headers={**auth(key), "content-type": "application/json"}, content="{"),
            400,
            "bad_request",
            "not JSON",
        )
        assert_error(api.post(path, headers=auth(key), json=[1]), 400, "bad_request", "object")
        assert_error(api.post(path, headers=auth(key), json=CHAT), 400, "bad_request", "'model'")
    assert_error(chat(api, key, run_id, stream="yes"), 400, "bad_request", "'stream'")
    for metadata in ("e1", {"gvpo_episode": 7}, {"gvpo_episode": "x" * 201}):
        assert_error(chat(api, key, run_id, metadata=metadata), 400, "bad_request", "metadata")


def test_without_an_inference_worker_a_503_says_what_to_start(
    api, settings, make_key, tiny_model_dir
):
    key = make_key("loop")
    run_id = submit(settings, tiny_model_dir)
    publish(settings, run_id, tiny_model_dir)
    for path in ("/v1/chat/completions", "/v1/completions"):
        body = {"model": run_id, "prompt": "ab", **CHAT}
        assert_error(api.post(path, headers=auth(key), json=body), 503, "unavailable", "gvpo serve")
    with session_scope(settings.resolved_database_url) as session:  # gone: no heartbeat
        stale = utcnow() - timedelta(seconds=settings.serve_stale_s + 5)
        session.add(
            InferenceWorker(
                id="old",
                url="http://127.0.0.1:9",
                models=[],
                memory_bytes=2**33,
                started_at=stale,
                heartbeat_at=stale,
            )
        )
    assert_error(chat(api, key, run_id), 503, "unavailable", "gvpo serve")
    with session_scope(settings.resolved_database_url) as session:  # alive, yet unreachable
        session.get(InferenceWorker, "old").heartbeat_at = utcnow()
    assert_error(chat(api, key, run_id), 503, "unavailable", "did not answer")


def test_recorded_answers_get_completion_ids_and_keep_the_exact_ids(settings, tiny_model_dir):
    run_id = submit(settings, tiny_model_dir)
    with session_scope(settings.resolved_database_url) as session:
        project_id = session.get(Run, run_id).project_id
    served = ServedModel(run_id, str(tiny_model_dir), 7, run_id, utcnow())
    url = settings.resolved_database_url
    answer = {
        "id": "chatcmpl-1",
        "prompt_token_ids": [1, 2, 3],
        "choices": [
            {
                "index": 0,
                "message": {"content": "ab"},
                "token_ids": [4, 5],
                "finish_reason": "stop",
            },
            {"index": 1, "message": {"content": "c"}, "token_ids": [6], "finish_reason": "length"},
        ],
    }
    recorder = Recorder(url, project_id, served, "e1", show_ids=False)
    shown = recorder.whole(answer)
    ids = [c["completion_id"] for c in shown["choices"]]
    assert shown["id"] == ids[0] and len(set(ids)) == 2 and ids[0].startswith("cmpl_")
    assert shown["weights_step"] == 7
    assert "prompt_token_ids" not in shown and "token_ids" not in shown["choices"][0]
    recorder.store()

    streamed = Recorder(url, project_id, served, "e2", show_ids=True)
    chunks = [
        {"choices": [{"index": 0, "delta": {"content": ""}}], "prompt_token_ids": [1, 2]},
        {"choices": [{"index": 0, "delta": {"content": "x"}, "token_ids": [8]}]},
        {"choices": [{"index": 0, "delta": {"content": "y"}, "token_ids": [9, 10]}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"completion_tokens": 3}},
    ]
    shown = [streamed.chunk(c) for c in chunks]
    assert len({c["id"] for c in shown}) == 1 and shown[1]["choices"][0]["token_ids"] == [8]
    streamed.store()
    with session_scope(url) as session:
        rows = {
            c.text: (c.prompt_ids, c.token_ids, c.finish_reason, c.weights_step, c.episode)
            for c in session.scalars(select(Completion))
        }
    assert rows == {
        "ab": ([1, 2, 3], [4, 5], "stop", 7, "e1"),
        "c": ([1, 2, 3], [6], "length", 7, "e1"),
        "xy": ([1, 2], [8, 9, 10], "stop", 7, "e2"),
    }


def _completion(session, project_id: str, run_id: str | None, **fields) -> str:
    row = Completion(
        project_id=project_id,
        run_id=run_id,
        model=run_id or "ckpt_elsewhere",
        episode="e",
        weights_step=fields.pop("weights_step", 0),
        prompt_ids=[1, 2],
        token_ids=[3, 4, 2],
        text="ab",
        finish_reason="stop",
    )
    session.add(row)
    session.flush()
    return row.id


@pytest.mark.both_backends
def test_traffic_groups_are_checked_and_stored_with_their_ids(
    api, settings, make_key, tiny_model_dir
):
    key = make_key("loop")
    run_id = submit(settings, tiny_model_dir, training={"offpolicy_fraction": 1.0})
    other_run = submit(settings, tiny_model_dir, training={"offpolicy_fraction": 1.0})
    with session_scope(settings.resolved_database_url) as session:
        project_id = session.get(Run, run_id).project_id
        mine = [_completion(session, project_id, run_id, weights_step=s) for s in range(2 * K)]
        theirs = _completion(session, project_id, other_run)
    elsewhere_key = make_key("elsewhere")
    with session_scope(settings.resolved_database_url) as session:
        from service.models import Project

        elsewhere = session.scalar(select(Project).where(Project.name == "elsewhere"))
        foreign = _completion(session, elsewhere.id, None)

    def group(ids: list[list[str]], **extra) -> dict:
        return {
            "episodes": [{"completion_ids": e, "reward": i / 4} for i, e in enumerate(ids)],
            **extra,
        }

    def post(*groups):
        return api.post(
            f"/v1/runs/{run_id}/groups", headers=auth(key), json={"groups": list(groups)}
        )

    good = group([mine[0:2], mine[2:3], mine[3:4], mine[4:5]], source="agent")
    error = assert_error(
        post(
            group([mine[5:6]] * 3),
            group([[theirs], mine[5:6], mine[6:7], mine[7:8]]),
            group([["cmpl_nope"], mine[5:6], mine[6:7], mine[7:8]]),
            group([[foreign], mine[5:6], mine[6:7], mine[7:8]]),
            {"episodes": [{"completion_ids": mine[5:6]}] * K},
            group([mine[5:6], mine[5:6], mine[6:7], mine[7:8]]),
        ),
        422,
        "invalid_request",
    )
    messages = {f["field"]: f["message"] for f in error["details"]["fields"]}
    assert "group_size is 4" in messages["groups.0"]
    assert "reward" in messages["groups.4"]
    assert not {"groups.1", "groups.2", "groups.3", "groups.5"} & set(messages)  # found later
    error = assert_error(
        post(
            group([[theirs], mine[5:6], mine[6:7], mine[7:8]]),
            group([["cmpl_nope"], mine[5:6], mine[6:7], mine[7:8]]),
            group([[foreign], mine[5:6], mine[6:7], mine[7:8]]),
        ),
        422,
        "invalid_request",
    )
    messages = [f["message"] for f in error["details"]["fields"]]
    assert "not by run" in messages[0] and "cmpl_nope" in messages[1]
    assert "no completion" in messages[2]  # another project's is as unknown as a made-up one
    assert_error(
        post(group([mine[5:6], mine[5:6], mine[6:7], mine[7:8]])), 422, "invalid_request", "twice"
    )
    assert_error(
        api.post(f"/v1/runs/{run_id}/groups", headers=auth(elsewhere_key), json={"groups": [good]}),
        404,
        "not_found",
    )
    assert post(good).status_code == 202
    with session_scope(settings.resolved_database_url) as session:
        stored = session.scalar(select(RunGroup.body).where(RunGroup.run_id == run_id))
    assert stored["source"] == "agent" and len(stored["traffic"]) == K
    first = stored["traffic"][0]
    assert first["reward"] == 0
    assert [t["completion_id"] for t in first["turns"]] == mine[0:2]
    assert first["turns"][1] == {
        "completion_id": mine[1],
        "prompt_ids": [1, 2],
        "token_ids": [3, 4, 2],
        "weights_step": 1,
    }


# ---------------------------------------------------------------- relayed to a stand-in for vLLM

WHOLE = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [{"index": 0}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6},
}
EVENTS = [f'data: {{"object":"chat.completion.chunk","n":{i}}}\n\n'.encode() for i in range(5)]
# what vLLM sends last when the request asks for its usage (stream_options.include_usage)
USAGE_EVENT = (
    b'data: {"object":"chat.completion.chunk","choices":[],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}\n\n'
)
VLLM_ERROR = {"object": "error", "message": "max_tokens must be at least 1", "code": 400}


class FakeInference:
    """An inference worker's control server and the vLLM server it names, in one app: what it
    was asked (the versions, the relayed bodies and their Authorization) is kept. `serving`:
    the server address the worker gives (a dead one to play a server that went away)."""

    def __init__(self) -> None:
        self.versions: list[int] = []
        self.received: list[tuple[bytes, str | None]] = []
        self.server = ThreadServer(
            Starlette(
                routes=[
                    Route("/models", self.models, methods=["POST"]),
                    Route("/v1/chat/completions", self.chat, methods=["POST"]),
                ]
            )
        )
        self.url = self.serving = f"http://127.0.0.1:{self.server.port}"

    async def models(self, request: Request) -> JSONResponse:
        version = (await request.json())["version"]
        self.versions.append(version)
        return JSONResponse({"url": self.serving, "version": version})

    async def chat(self, request: Request):
        raw = await request.body()
        self.received.append((raw, request.headers.get("authorization")))
        body = json.loads(raw)
        if body["max_tokens"] < 1:
            return JSONResponse(VLLM_ERROR, status_code=400)
        if not body.get("stream"):
            return JSONResponse(WHOLE)

        async def events():
            for event in EVENTS:
                yield event
            if (body.get("stream_options") or {}).get("include_usage"):
                yield USAGE_EVENT
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture
def inference(settings):
    fake = FakeInference()
    with fake.server:
        with session_scope(settings.resolved_database_url) as session:
            now = utcnow()
            session.add(
                InferenceWorker(
                    id="fake",
                    url=fake.url,
                    models=[],
                    memory_bytes=2**33,
                    started_at=now,
                    heartbeat_at=now + timedelta(days=1),
                )
            )
        yield fake


def test_answers_errors_and_streams_are_relayed_as_vllm_sends_them(
    api, settings, make_key, tiny_model_dir, inference
):
    key = make_key("loop")
    run_id = submit(settings, tiny_model_dir)
    ckpt = checkpoint(settings, run_id, tiny_model_dir)
    raw = b'{"model": "%s", "messages": [], "max_tokens": 4,  "x": "\\u00e9"}' % ckpt.encode()
    whole = api.post("/v1/chat/completions", headers=auth(key), content=raw)
    assert whole.status_code == 200 and whole.json() == WHOLE
    assert inference.received[-1][0] == raw  # as it came, byte for byte
    assert inference.received[-1][1] == f"Bearer {settings.serve_token}"
    refused = chat(api, key, ckpt, max_tokens=0)
    assert refused.status_code == 400 and refused.json() == VLLM_ERROR
    with api.stream(
        "POST",
        "/v1/chat/completions",
        headers=auth(key),
        json={"model": ckpt, **CHAT, "stream": True},
    ) as streamed:
        assert streamed.headers["content-type"].startswith("text/event-stream")
        # its usage was asked of vLLM, and not passed on to a client that did not ask for it
        assert streamed.read() == b"".join(EVENTS) + b"data: [DONE]\n\n"
    assert json.loads(inference.received[-1][0])["stream_options"] == {"include_usage": True}
    with api.stream(
        "POST",
        "/v1/chat/completions",
        headers=auth(key),
        json={"model": ckpt, **CHAT, "stream": True, "stream_options": {"include_usage": True}},
    ) as streamed:
        assert streamed.read() == b"".join(EVENTS) + USAGE_EVENT + b"data: [DONE]\n\n"

    # counted for the project under the checkpoint's run, as vLLM counted it: the whole answer
    # and both streams (the first asked of vLLM for its client), not the refused request
    def served() -> dict:
        return api.get("/v1/usage", params={"group_by": "run"}, headers=auth(key)).json()

    wait_until(lambda: served()["total"]["inference_requests"] == 3, 30, "the usage counted")
    (row,) = served()["data"]
    assert row["run_id"] == run_id
    assert row["inference_prompt_tokens"] == 2 + 3 + 3
    assert row["inference_completion_tokens"] == 4 + 5 + 5


def test_a_server_that_stopped_answering_is_asked_for_again(
    api, settings, make_key, tiny_model_dir, inference
):
    key = make_key("loop")
    ckpt = checkpoint(settings, submit(settings, tiny_model_dir), tiny_model_dir)
    inference.serving = "http://127.0.0.1:9"  # nothing listens there
    assert_error(chat(api, key, ckpt), 503, "unavailable", "stopped answering")
    assert inference.versions == [1, 1]  # asked again after the first try failed
    inference.serving = inference.url
    assert chat(api, key, ckpt).status_code == 200


def test_a_kept_key_goes_after_its_seconds_and_a_kept_model_when_its_files_do(
    api, settings, make_key, tiny_model_dir, inference, tmp_path
):
    key = make_key("loop")
    lookups = api.app.state.lookups
    now = time.monotonic()  # still: nothing kept goes while a loaded machine runs the test
    lookups.projects.clock = lookups.models.clock = lambda: now
    run_id = submit(settings, tiny_model_dir)
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, folder)
    ckpt = checkpoint(settings, run_id, folder)
    assert chat(api, key, ckpt).status_code == 200
    moved = shutil.move(folder, tmp_path / "elsewhere")
    assert_error(chat(api, key, ckpt), 410, "gone", "files are gone")  # at once
    shutil.move(moved, folder)
    assert chat(api, key, ckpt).status_code == 200

    with session_scope(settings.resolved_database_url) as session:
        revoke_api_key(session, session.scalar(select(ApiKey.id)))
    assert chat(api, key, ckpt).status_code == 200  # taken for up to KEY_TTL_S
    later = now + KEY_TTL_S
    lookups.projects.clock = lambda: later
    assert_error(chat(api, key, ckpt), 401, "unauthorized", "invalid API key")


def test_a_run_is_served_from_the_weights_it_published_last(
    api, settings, make_key, tiny_model_dir, inference
):
    key = make_key("loop")
    run_id = submit(settings, tiny_model_dir)
    publish(settings, run_id, tiny_model_dir, step=1)
    assert chat(api, key, run_id).status_code == 200
    publish(settings, run_id, tiny_model_dir, step=2)
    assert chat(api, key, run_id).status_code == 200
    assert inference.versions == [1, 2]  # the newer weights, asked for at once
