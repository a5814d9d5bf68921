"""The public REST API through a TestClient: auth, files, run creation and validation,
idempotency, project isolation, listing, cancel, read endpoints and health.

No worker runs here, so runs stay queued; the real filesystem broker shows what was enqueued.
"""

import time

import pytest
from sqlalchemy import select

from service.auth.service import revoke_api_key
from service.db import session_scope
from service.models import ApiKey, Run
from service.models.base import utcnow
from service.serving.lookups import KEY_TTL_S

from factories import (
    DROP,
    EPISODE_METRICS,
    EXACT_MATCH,
    TOOL_RUN,
    assert_error,
    auth,
    broker_run_ids,
    copy_rows,
    jsonl,
    post_file,
    record_episode_steps,
    run_spec,
    tool_episodes,
    upload,
)

pytestmark = pytest.mark.both_backends

# How these tests change the copy task (no worker runs here: the API checks and stores them).
API_RUN = {
    "name": "api-test",
    "reward": EXACT_MATCH,
    "algorithm": {"beta": 0.1},
    "sampling": {"max_new_tokens": 16},  # within the tiny model's context
    "optimizer": DROP,
    "training": {"steps": 3, "prompts_per_step": 4},
}
ROWS = copy_rows(8)  # a training file's
TINY = {}  # "model": the tiny model's path (checked at submission), set by _tiny_model


@pytest.fixture(autouse=True)
def _tiny_model(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(TINY, "model", str(tiny_model_dir))


def spec(train_file: str, **sections) -> dict:
    """A valid run spec over train_file: run_spec(..., API_RUN, **sections)."""
    return run_spec(TINY["model"], train_file, API_RUN, **sections)


def new_run(api, key: str, train_file: str, headers: dict | None = None, **overrides) -> dict:
    resp = api.post(
        "/v1/runs", headers={**auth(key), **(headers or {})}, json=spec(train_file, **overrides)
    )
    assert resp.status_code == 201, resp.text
    return resp.json()


def run_ids(api, key: str, **params) -> list[str]:
    resp = api.get("/v1/runs", headers=auth(key), params=params)
    assert resp.status_code == 200, resp.text
    return [r["id"] for r in resp.json()["data"]]


# ---------------------------------------------------------------- auth


@pytest.mark.parametrize(
    "headers, needle",
    [
        ({}, "missing API key"),
        ({"Authorization": "Bearer gvpo_sk_not-a-real-key"}, "invalid API key"),
        ({"Authorization": "Token x"}, "malformed Authorization header"),
        ({"Authorization": "Bearer "}, "malformed Authorization header"),
    ],
)
def test_requests_without_a_valid_key_are_401(api, make_key, headers, needle):
    make_key("team-a")
    for method, path in [
        ("GET", "/v1/runs"),
        ("GET", "/v1/files"),
        ("POST", "/v1/runs"),
        ("GET", "/v1/runs/run_x"),
        ("POST", "/v1/runs/run_x/cancel"),
    ]:
        resp = api.request(method, path, headers=headers, json={})
        assert_error(resp, 401, "unauthorized", needle)
    ok = api.get("/v1/runs", headers=auth(make_key("team-a")))
    assert ok.status_code == 200 and ok.json()["data"] == []


# ---------------------------------------------------------------- files


def test_upload_lists_and_shows_a_jsonl_file(api, make_key):
    key = make_key()
    rows = [{"prompt": "a=", "answer": "a", "meta": {"x": 1}}, {"prompt": "b=", "answer": "b"}]
    content = b"\n" + jsonl(rows[:1]) + b"  \n\n" + jsonl(rows[1:])  # blank lines are skipped
    resp = post_file(api, key, content, purpose="eval", filename="mine.jsonl")
    assert resp.status_code == 201, resp.text
    file = resp.json()
    assert file["id"].startswith("file_") and file["object"] == "file"
    assert (file["filename"], file["purpose"], file["rows"], file["bytes"]) == (
        "mine.jsonl",
        "eval",
        2,
        len(content),
    )
    assert file["fields"] == ["answer", "prompt"]  # scalar fields present in every row

    shown = api.get(f"/v1/files/{file['id']}", headers=auth(key))
    assert shown.status_code == 200 and shown.json() == file
    listed = api.get("/v1/files", headers=auth(key)).json()
    assert listed["object"] == "list" and listed["data"] == [file]
    downloaded = api.get(f"/v1/files/{file['id']}/content", headers=auth(key))
    assert downloaded.status_code == 200 and downloaded.content == content
    assert_error(
        api.get(f"/v1/files/{file['id']}/content", headers=auth(make_key("other"))),
        404,
        "not_found",
    )


@pytest.mark.parametrize(
    "content, purpose, needles, line",
    [
        (
            b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": \n',
            "train",
            ["line 3", "not valid JSON"],
            3,
        ),
        (b'{"prompt": "a"}\n["prompt", "b"]\n', "train", ["line 2", "JSON object", "list"], 2),
        (b'{"prompt": "a"}\n{"prompt": "\xff\xfe"}\n', "train", ["line 2", "UTF-8"], 2),
        (b'{"prompt": "a"}\n{"n": ' + b"9" * 5000 + b"}\n", "train", ["line 2", "digits"], 2),
        (b'{"prompt": "a"}\n' + b"[" * 100_000 + b"]" * 100_000, "train", ["line 2", "deeply"], 2),
        (b'{"prompt": "a"}\n{"prompt": "b\\u0000"}\n', "train", ["line 2", "NUL"], 2),
        (b"", "train", ["no rows"], None),
        (b"\n  \n", "train", ["no rows"], None),
        (jsonl(copy_rows(2)), "finetune", ["purpose", "'finetune'"], None),
    ],
)
def test_bad_upload_is_400_and_leaves_nothing_behind(
    api, make_key, settings, content, purpose, needles, line
):
    key = make_key()
    error = assert_error(
        post_file(api, key, content, purpose=purpose), 400, "bad_request", *needles
    )
    if line is not None:
        assert error["details"]["line"] == line
    assert list(settings.files_dir.glob("*")) == []
    assert api.get("/v1/files", headers=auth(key)).json()["data"] == []


def test_upload_over_the_size_limit_is_413_and_leaves_nothing_behind(settings, make_key):
    from fastapi.testclient import TestClient

    from service.main import create_app

    key = make_key()
    small = settings.model_copy(update={"max_upload_bytes": 1000, "reaper_interval_s": 0})
    with TestClient(create_app(small)) as api:
        assert post_file(api, key, copy_rows(5)).status_code == 201  # under
        error = assert_error(
            post_file(api, key, copy_rows(100)), 413, "payload_too_large", "1000-byte limit"
        )
        assert len(api.get("/v1/files", headers=auth(key)).json()["data"]) == 1
    assert len(list(settings.files_dir.glob("*"))) == 1
    assert error["details"] == {}


# ---------------------------------------------------------------- run creation


@pytest.mark.parametrize(
    "overrides, fields",
    [
        ({"algorithm": {"group_size": 1}}, ["algorithm.group_size"]),
        ({"algorithm": {"beta": 0}}, ["algorithm.beta"]),
        ({"algorithm": {"beta": -0.5}}, ["algorithm.beta"]),
        ({"algorithm": {"group_size": 1, "beta": 0}}, ["algorithm.beta", "algorithm.group_size"]),
        ({"learning_rate": 1e-5}, ["learning_rate"]),
        ({"reward": DROP}, ["reward"]),
        ({"model": {"path": DROP}}, ["model.path"]),
        ({"reward": {"type": "builtin", "name": "no_such_reward"}}, ["reward.name"]),
        ({"training": {"mini_batches": 5, "prompts_per_step": 4}}, ["training.mini_batches"]),
        # the default (4 mini-batches) breaks the rule as surely as a value written out
        ({"training": {"mini_batches": DROP, "prompts_per_step": 2}}, ["training.mini_batches"]),
        ({"dataset": {"train_file": "file_doesnotexist"}}, ["dataset.train_file"]),
        ({"dataset": {"eval_file": "file_doesnotexist"}}, ["dataset.eval_file"]),
        ({"eval": {"k": 5, "samples_per_prompt": 4}}, ["eval.k"]),
        ({"dataset": {"prompt_field": "question"}}, ["dataset.prompt_field"]),
        (
            {
                "reward": {
                    "type": "webhook",
                    "url": "https://rm.example.com/score",
                    "timeout_s": 120,
                },
                "resources": {"step_timeout_s": 60},
            },
            ["resources"],
        ),
        ({"resources": {"gpus": 9}}, ["resources.gpus"]),
        ({"resources": {"gpus": 2, "processes": 1}}, ["resources"]),
        ({"resources": {"processes": 3}}, ["resources"]),  # 4 prompts per step
        ({"rollout": {"tensor_parallel_size": 2}}, ["resources"]),  # one process
        (
            {"rollout": {"engine": "hf", "tensor_parallel_size": 2}, "resources": {"processes": 2}},
            ["resources"],
        ),
    ],
    ids=[
        "group_size",
        "beta_zero",
        "beta_negative",
        "both",
        "unknown_field",
        "no_reward",
        "no_model_path",
        "unknown_reward",
        "mini_batches",
        "default_mini_batches",
        "missing_file",
        "missing_eval_file",
        "eval_k",
        "prompt_field",
        "step_timeout",
        "too_many_gpus",
        "processes_vs_gpus",
        "uneven_prompts",
        "tensor_parallel_vs_processes",
        "tensor_parallel_without_vllm",
    ],
)
def test_invalid_spec_is_422_naming_each_field(api, make_key, settings, overrides, fields):
    key = make_key()
    body = spec(upload(api, key, ROWS), **overrides)
    error = assert_error(
        api.post("/v1/runs", headers=auth(key), json=body), 422, "invalid_request", *fields
    )
    assert sorted(f["field"] for f in error["details"]["fields"]) == fields
    assert all(f["message"] for f in error["details"]["fields"])
    assert run_ids(api, key) == [] and broker_run_ids(settings) == []


def test_a_422_names_each_field_once_in_the_users_words(api, make_key):
    """An unknown field, at any depth and inside a tagged union, with the field of its level it
    is closest to; a value that fits no branch of a union named once, as one field; a rule's
    message without pydantic's "Value error," in front."""
    key = make_key()
    body = spec(
        upload(api, key, ROWS),
        algorithm={"betta": 0.1},
        reward={**EXACT_MATCH, "nmae": "x"},
        model={"path": DROP, "lora": {"target_modules": 5}},
    )
    error = assert_error(api.post("/v1/runs", headers=auth(key), json=body), 422, "invalid_request")
    assert {f["field"]: f["message"] for f in error["details"]["fields"]} == {
        "model.path": "Field required (the model's directory or hub id; or set model.checkpoint "
        "to start from a checkpoint)",
        "model.lora.target_modules": "Input should be a valid string or a valid list",
        "reward.nmae": "unknown field (did you mean name?)",
        "algorithm.betta": "unknown field (did you mean beta?)",
    }
    assert "Extra inputs" not in error["message"] and "Value error" not in error["message"]


@pytest.mark.parametrize(
    "resources, rollout, says",
    [
        ({"gpus": 2, "processes": 1}, {}, "processes (1) must equal gpus (2)"),
        (
            {"processes": 3},
            {},
            "prompts_per_step (4) must be a multiple of the 3 training processes",
        ),
        (
            {},
            {"tensor_parallel_size": 2},
            "tensor_parallel_size (2) must divide the 1 training processes",
        ),
        (
            {"processes": 2},
            {"engine": "hf", "tensor_parallel_size": 2},
            "tensor_parallel_size needs vLLM",
        ),
    ],
    ids=["processes_vs_gpus", "uneven_prompts", "tensor_parallel", "tensor_parallel_hf"],
)
def test_multi_process_spec_errors_say_what_to_change(api, make_key, resources, rollout, says):
    key = make_key()
    body = spec(upload(api, key, ROWS), resources=resources, rollout=rollout)
    error = assert_error(api.post("/v1/runs", headers=auth(key), json=body), 422, "invalid_request")
    assert says in error["details"]["fields"][0]["message"]


def test_an_eval_file_is_checked_like_the_training_file(api, make_key):
    key, other = make_key("team-a"), make_key("team-b")
    train, evals = upload(api, key, ROWS), upload(api, key, copy_rows(3))
    run = new_run(api, key, train, dataset={"eval_file": evals}, eval={"k": 2})
    assert run["spec"]["dataset"]["eval_file"] == evals
    assert run["spec"]["eval"] == {
        "every_steps": 20,
        "samples_per_prompt": 4,
        "k": 2,
        "pass_threshold": 1.0,
        "max_prompts": None,
    }
    foreign = upload(api, other, copy_rows(3))
    no_answer = upload(api, key, [{"prompt": "p"}])
    for eval_file, field in ((foreign, "dataset.eval_file"), (no_answer, "dataset.answer_field")):
        body = spec(train, dataset={"eval_file": eval_file})
        error = assert_error(
            api.post("/v1/runs", headers=auth(key), json=body), 422, "invalid_request", field
        )
        assert [f["field"] for f in error["details"]["fields"]] == [field]


def test_train_file_of_another_project_is_422_without_leaking_it(api, make_key, settings):
    other, key = make_key("team-b"), make_key("team-a")
    foreign = upload(api, other, [{"prompt": "p", "answer": "a", "secret_col": "s"}])
    resp = api.post("/v1/runs", headers=auth(key), json=spec(foreign))
    error = assert_error(resp, 422, "invalid_request", "dataset.train_file")
    assert [f["field"] for f in error["details"]["fields"]] == ["dataset.train_file"]
    assert "secret_col" not in resp.text and "team-b" not in resp.text
    assert run_ids(api, key) == [] and run_ids(api, other) == []
    assert broker_run_ids(settings) == []


def test_valid_run_is_queued_and_enqueued_once(api, make_key, settings):
    key = make_key()
    file_id = upload(api, key, ROWS)
    run = new_run(api, key, file_id)
    assert run["status"] == "queued" and run["id"].startswith("run_")
    assert run["webhook_secret"].startswith("whsec_")
    assert (run["step"], run["total_steps"], run["finished_at"]) == (0, 3, None)
    assert run["spec"]["dataset"]["train_file"] == file_id
    assert run["spec"]["algorithm"]["reference"] == "initial"  # defaults are filled in

    shown = api.get(f"/v1/runs/{run['id']}", headers=auth(key))
    assert shown.status_code == 200
    assert "webhook_secret" not in shown.json() and run["webhook_secret"] not in shown.text
    assert shown.json() == {k: v for k, v in run.items() if k != "webhook_secret"}
    assert broker_run_ids(settings) == [run["id"]]
    events = api.get(f"/v1/runs/{run['id']}/events", headers=auth(key)).json()["data"]
    assert [e["type"] for e in events] == ["run.queued"]


def test_idempotency_key_replays_and_conflicts(api, make_key, settings):
    key, other = make_key("team-a"), make_key("team-b")
    file_id = upload(api, key, ROWS)
    headers = {**auth(key), "Idempotency-Key": "req-1"}
    first = api.post("/v1/runs", headers=headers, json=spec(file_id))
    again = api.post("/v1/runs", headers=headers, json=spec(file_id))
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert broker_run_ids(settings) == [first.json()["id"]]

    changed = api.post("/v1/runs", headers=headers, json=spec(file_id, name="changed"))
    error = assert_error(
        changed, 409, "conflict", "Idempotency-Key", "req-1", "different request body"
    )
    assert error["details"]["run_id"] == first.json()["id"]
    assert run_ids(api, key) == [first.json()["id"]]
    assert broker_run_ids(settings) == [first.json()["id"]]

    theirs = new_run(api, other, upload(api, other, ROWS), headers={"Idempotency-Key": "req-1"})
    assert theirs["id"] != first.json()["id"]
    assert run_ids(api, other) == [theirs["id"]]
    assert sorted(broker_run_ids(settings)) == sorted([first.json()["id"], theirs["id"]])


# ---------------------------------------------------------------- isolation


def test_projects_see_only_their_own_runs_and_files(api, make_key):
    mine, theirs = make_key("team-a"), make_key("team-b")
    my_file, their_file = upload(api, mine, ROWS), upload(api, theirs, ROWS)
    my_run, their_run = new_run(api, mine, my_file), new_run(api, theirs, their_file)
    rid = their_run["id"]
    for method, path in [
        ("GET", ""),
        ("POST", "/cancel"),
        ("POST", "/pause"),
        ("POST", "/resume"),
        ("GET", "/events"),
        ("GET", "/metrics"),
        ("GET", "/samples"),
        ("GET", "/checkpoints"),
        ("GET", "/checkpoints/ckpt_x/download"),
    ]:
        resp = api.request(method, f"/v1/runs/{rid}{path}", headers=auth(mine))
        assert_error(resp, 404, "not_found", rid)
    assert_error(
        api.get(f"/v1/files/{their_file}", headers=auth(mine)), 404, "not_found", their_file
    )

    assert run_ids(api, mine) == [my_run["id"]] and run_ids(api, theirs) == [rid]
    assert [f["id"] for f in api.get("/v1/files", headers=auth(mine)).json()["data"]] == [my_file]
    still = api.get(f"/v1/runs/{rid}", headers=auth(theirs)).json()
    assert still["status"] == "queued"  # the refused cancel changed nothing


# ---------------------------------------------------------------- listing


def test_list_runs_pages_newest_first(api, make_key):
    key = make_key()
    file_id = upload(api, key, ROWS)
    created = [new_run(api, key, file_id, name=f"run-{i}")["id"] for i in range(5)]

    seen, pages, cursor = [], [], None
    while True:
        params = {"limit": 2, **({"after": cursor} if cursor else {})}
        page = api.get("/v1/runs", headers=auth(key), params=params).json()
        pages.append(len(page["data"]))
        seen += [r["id"] for r in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
        assert cursor == seen[-1]
    assert pages == [2, 2, 1]
    assert seen == created[::-1]

    assert api.post(f"/v1/runs/{created[0]}/cancel", headers=auth(key)).status_code == 200
    assert run_ids(api, key, status="queued") == created[:0:-1]
    assert run_ids(api, key, status="cancelled") == [created[0]]
    assert run_ids(api, key, status="running") == []


@pytest.mark.filterwarnings(
    "error::UserWarning"
)  # no serializer warning: the listing is written by hand
def test_a_listed_run_is_the_run_read_alone(api, settings, make_key):
    # A listing passes each stored spec through as text: every run must still read exactly as
    # GET /v1/runs/{id} reads it, whatever its state and whatever characters its spec holds.
    key = make_key()
    file_id = upload(api, key, ROWS)
    ids = [
        new_run(api, key, file_id, name="plain")["id"],
        new_run(api, key, file_id, name='ünïcødé ✓ "quoted" \\ run', sampling={"temperature": 0.7})[
            "id"
        ],
        new_run(api, key, file_id, name=None)["id"],
    ]
    assert api.post(f"/v1/runs/{ids[0]}/cancel", headers=auth(key)).status_code == 200
    with session_scope(settings.resolved_database_url) as session:
        run = session.get(Run, ids[1])
        run.step, run.reward, run.tokens_generated, run.started_at = 2, -0.125, 77, utcnow()
    listed = api.get("/v1/runs", headers=auth(key)).json()
    alone = [api.get(f"/v1/runs/{run_id}", headers=auth(key)).json() for run_id in ids[::-1]]
    assert listed == {"object": "list", "data": alone, "has_more": False, "next_cursor": None}
    assert alone[1]["name"] == 'ünïcødé ✓ "quoted" \\ run' and alone[1]["reward"] == -0.125
    assert alone[1]["spec"]["sampling"]["temperature"] == 0.7


def test_a_revoked_key_lists_runs_for_at_most_its_kept_seconds(api, settings, make_key):
    # GET /v1/runs keeps a key it checked for KEY_TTL_S, as the inference routes do.
    key = make_key()
    lookups = api.app.state.lookups
    now = time.monotonic()  # still: nothing kept goes while a loaded machine runs the test
    lookups.projects.clock = lambda: now
    assert run_ids(api, key) == []
    with session_scope(settings.resolved_database_url) as session:
        revoke_api_key(session, session.scalar(select(ApiKey.id)))
    assert run_ids(api, key) == []  # kept
    assert_error(api.get("/v1/runs/run_x", headers=auth(key)), 401, "unauthorized")
    later = now + KEY_TTL_S
    lookups.projects.clock = lambda: later
    assert_error(api.get("/v1/runs", headers=auth(key)), 401, "unauthorized", "invalid API key")


# The listing reads its own parameters (deps.query): refused as FastAPI refused them, the last
# of a repeated parameter counting, unknown ones ignored.
@pytest.mark.parametrize(
    "query, field, needle",
    [
        ("status=bogus", "status", "'queued', 'running'"),
        ("status=", "status", "'queued', 'running'"),
        ("limit=0", "limit", "greater than or equal to 1"),
        ("limit=101", "limit", "less than or equal to 100"),
        ("limit=abc", "limit", "valid integer"),
        ("limit=5&limit=0", "limit", "greater than or equal to 1"),
        ("after=" + "r" * 65, "after", "at most 64 characters"),
    ],
)
def test_list_runs_rejects_bad_query(api, make_key, query, field, needle):
    error = assert_error(
        api.get(f"/v1/runs?{query}&unknown=1", headers=auth(make_key())),
        422,
        "invalid_request",
        field,
        needle,
    )
    assert [f["field"] for f in error["details"]["fields"]] == [field]


def test_list_runs_refuses_an_overlong_key_naming_it(api):
    error = assert_error(
        api.get("/v1/runs", headers={"Authorization": "Bearer " + "k" * 1000}),
        422,
        "invalid_request",
        "at most 1000 characters",
    )
    assert [f["field"] for f in error["details"]["fields"]] == ["authorization"]


def test_list_runs_reads_the_last_of_a_repeated_parameter(api, make_key):
    key = make_key()
    file_id = upload(api, key, ROWS)
    for _ in range(3):
        new_run(api, key, file_id)
    page = api.get("/v1/runs?limit=0&limit=2&unknown=x", headers=auth(key))
    assert page.status_code == 200 and len(page.json()["data"]) == 2


# ---------------------------------------------------------------- cancel and read endpoints


def test_cancel_queued_run_then_cancel_again_is_409(api, make_key):
    key = make_key()
    run = new_run(api, key, upload(api, key, ROWS))
    resp = api.post(f"/v1/runs/{run['id']}/cancel", headers=auth(key))
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"

    shown = api.get(f"/v1/runs/{run['id']}", headers=auth(key)).json()
    assert shown["status"] == "cancelled" and shown["finished_at"] is not None
    events = api.get(f"/v1/runs/{run['id']}/events", headers=auth(key)).json()["data"]
    assert [e["type"] for e in events] == ["run.queued", "run.cancelled"]

    again = api.post(f"/v1/runs/{run['id']}/cancel", headers=auth(key))
    assert_error(again, 409, "conflict", run["id"], "cancelled")
    events = api.get(f"/v1/runs/{run['id']}/events", headers=auth(key)).json()["data"]
    assert len(events) == 2


def test_pause_and_resume_over_http_with_409_for_illegal_transitions(api, make_key, settings):
    key = make_key()
    run = new_run(api, key, upload(api, key, ROWS))
    rid = run["id"]
    assert_error(
        api.post(f"/v1/runs/{rid}/resume", headers=auth(key)),
        409,
        "conflict",
        "queued",
        "only a paused run",
    )
    paused = api.post(f"/v1/runs/{rid}/pause", headers=auth(key))
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    assert_error(api.post(f"/v1/runs/{rid}/pause", headers=auth(key)), 409, "conflict", "paused")
    before = broker_run_ids(settings)
    resumed = api.post(f"/v1/runs/{rid}/resume", headers=auth(key))
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    # paused before a worker took it: the message it has waiting starts it, no second one
    assert broker_run_ids(settings) == before == [rid]
    assert api.post(f"/v1/runs/{rid}/cancel", headers=auth(key)).json()["status"] == "cancelled"
    assert_error(api.post(f"/v1/runs/{rid}/pause", headers=auth(key)), 409, "conflict", "cancelled")
    events = api.get(f"/v1/runs/{rid}/events", headers=auth(key)).json()["data"]
    assert [e["type"] for e in events] == [
        "run.queued",
        "run.paused",
        "run.resume_requested",
        "run.cancelled",
    ]


def test_fresh_run_has_empty_metrics_samples_checkpoints(api, make_key):
    key = make_key()
    rid = new_run(api, key, upload(api, key, ROWS))["id"]
    base = f"/v1/runs/{rid}"
    get = lambda path, **params: api.get(base + path, headers=auth(key), params=params)  # noqa: E731

    assert get("/metrics").json() == {"run_id": rid, "metrics": {}, "downsampled": []}
    assert get("/metrics", names="loss,reward/mean", since_step=1).json()["metrics"] == {}
    assert get("/samples").json() == {"object": "list", "step": None, "data": []}
    assert get("/samples", step=3).json()["data"] == []
    assert get("/checkpoints").json() == {"object": "list", "data": []}
    assert_error(get("/checkpoints/ckpt_nope/download"), 404, "not_found", "ckpt_nope")

    events = get("/events").json()
    assert [e["type"] for e in events["data"]] == ["run.queued"] and not events["has_more"]
    first = events["data"][0]["id"]
    assert get("/events", after=first).json() == {"object": "list", "data": [], "has_more": False}
    assert [e["id"] for e in get("/events", after=first - 1).json()["data"]] == [first]
    assert_error(get("/events", after=-1), 422, "invalid_request", "after")


def test_samples_of_a_multi_turn_run_show_each_episode_turn_by_turn(api, make_key, settings):
    key = make_key()
    run_id = new_run(api, key, upload(api, key, ROWS), **TOOL_RUN)["id"]
    record_episode_steps(settings, run_id, steps=1)
    plain_id = new_run(api, key, upload(api, key, ROWS))["id"]
    record_episode_steps(settings, plain_id, steps=1, episodes=False)

    got = api.get(f"/v1/runs/{run_id}/samples", headers=auth(key)).json()
    assert got["step"] == 1
    assert [s["episode"] for s in got["data"]] == [s["episode"] for s in tool_episodes()]
    done, cut, long = (s["episode"] for s in got["data"])
    assert [(t["role"], t["trained"]) for t in done["turns"]] == [
        ("assistant", True),
        ("tool", False),
        ("assistant", True),
    ]
    assert done["turns"][0]["tool_calls"][0]["function"]["name"] == "python"
    assert done["turns"][1]["tool_call_id"] == "call_0"
    assert (done["end"], done["trained_tokens"], done["tokens"]) == ("done", 29, 40)
    assert (cut["end"], long["end"]) == ("max_turns", "max_episode_tokens")
    # a single completion has none
    plain = api.get(f"/v1/runs/{plain_id}/samples", headers=auth(key)).json()["data"]
    assert plain and all(s["episode"] is None for s in plain)

    # the OpenAPI document says so, and the metrics come back like any other
    schemas = api.get("/openapi.json").json()["components"]["schemas"]
    assert {"EpisodeRead", "EpisodeTurn"} <= schemas.keys()
    names = ",".join(EPISODE_METRICS)
    series = api.get(f"/v1/runs/{run_id}/metrics", headers=auth(key), params={"names": names})
    assert series.json()["metrics"].keys() == set(EPISODE_METRICS)


# ---------------------------------------------------------------- health and meta


def test_openapi_health_and_unknown_paths(api):
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/v1/runs", "/v1/files", "/v1/runs/{run_id}", "/v1/files/{file_id}"} <= set(paths)

    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "checks": {"database": "ok", "broker": "ok"}}

    assert_error(api.get("/v1/no-such-thing"), 404, "not_found", "/v1/no-such-thing")
