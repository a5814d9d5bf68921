"""Bounds at the edge: every number, string and list that a request can carry (a run spec, a
query, a header, a path id, a posted body) has a limit that the database and the hardware can
hold, and a request past one, or with NUL in its text, is a 4xx naming the field, never a server
error (PostgreSQL's integers are 32-bit and its text cannot hold NUL). The requests are read
from the app's OpenAPI document, so a new endpoint is walked without being listed here."""

import json

import pytest

from service.contract.limits import INT32_MAX
from service.main import create_app

from factories import (
    EXACT_MATCH,
    assert_error,
    auth,
    copy_rows,
    jsonl,
    run_spec,
    submit,
    upload,
)


def unbounded(node, path: str = "") -> list[str]:
    """The integers without a maximum (or one past INT32_MAX), the free-text strings without a
    maximum length and the lists without a maximum number of items in a JSON schema. An
    uploaded file's content (contentMediaType) is bounded by the upload limit instead."""
    found = []
    if isinstance(node, dict):
        kind = node.get("type")
        if kind == "integer" and node.get("maximum", INT32_MAX + 1) > INT32_MAX:
            found.append(path)
        free_text = not {"enum", "const", "format", "contentMediaType"} & set(node)
        if kind == "string" and free_text and "maxLength" not in node:
            found.append(path)
        if kind == "array" and "maxItems" not in node:
            found.append(path)
        for key, value in node.items():
            found += unbounded(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += unbounded(value, f"{path}/{i}")
    return found


def resolved(node, components: dict, seen: tuple[str, ...] = ()):
    """`node` with every $ref to a component schema replaced by the schema itself."""
    if isinstance(node, dict):
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            assert name not in seen, f"recursive schema {name}: bound its depth"
            return resolved(components[name], components, (*seen, name))
        return {key: resolved(value, components, seen) for key, value in node.items()}
    if isinstance(node, list):
        return [resolved(value, components, seen) for value in node]
    return node


def request_schemas(app) -> dict[str, dict]:
    """ "METHOD /path in name" -> schema, for every parameter (in: path, query, header) and
    every request body (in: the media type) of every operation of the app."""
    document = app.openapi()
    components = document.get("components", {}).get("schemas", {})
    schemas = {}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            label = f"{method.upper()} {path}"
            for parameter in operation.get("parameters", []):
                where = f"{parameter['in']} {parameter['name']}"
                schemas[f"{label} {where}"] = resolved(parameter["schema"], components)
            for media, content in operation.get("requestBody", {}).get("content", {}).items():
                schemas[f"{label} {media}"] = resolved(content["schema"], components)
    return schemas


def test_every_number_string_and_list_a_request_carries_is_bounded(settings):
    schemas = request_schemas(create_app(settings))
    assert {  # the walk sees every kind of request body, the callback read as raw bytes too
        "POST /v1/runs application/json",
        "POST /v1/files multipart/form-data",
        "POST /v1/gvpo:dry_run application/json",
        "POST /v1/runs/{run_id}/groups application/json",
        "POST /v1/runs/{run_id}/rescore application/json",
        "POST /v1/runs/{run_id}/rewards application/json",
        "GET /v1/runs/{run_id}/events query after",
    } <= set(schemas)
    found = {label: unbounded(schema) for label, schema in schemas.items()}
    assert {label: paths for label, paths in found.items() if paths} == {}


SPEC_PAST_THE_LIMITS = [
    ({"training": {"steps": 2**31}}, "training.steps"),
    ({"training": {"prompts_per_step": 10**9}}, "training.prompts_per_step"),
    ({"training": {"seed": 2**40}}, "training.seed"),
    ({"sampling": {"max_new_tokens": 2**40}}, "sampling.max_new_tokens"),
    ({"sampling": {"stop": ["x"] * 1000}}, "sampling.stop"),
    ({"checkpoint": {"keep_last": 2**33}}, "checkpoint.keep_last"),
    ({"algorithm": {"beta": 1e300}}, "algorithm.beta"),
    ({"model": {"lora": {"target_modules": ["q_proj"] * 1001}}}, "model.lora.target_modules"),
    ({"name": "a\x00b"}, "NUL"),
    ({"sampling": {"stop": ["ok", "bad\x00"]}}, "NUL"),
    ({"dataset": {"prompt_field": "p\x00"}}, "NUL"),
    ({"model": {"path": "/models/x\x00y"}}, "NUL"),
    ({"reward": {"type": "builtin", "name": "regex", "params": {"pattern": "a\x00"}}}, "NUL"),
]


@pytest.mark.both_backends
@pytest.mark.parametrize("change, needle", SPEC_PAST_THE_LIMITS)
def test_a_spec_past_a_limit_is_a_422_naming_it(api, make_key, tiny_model_dir, change, needle):
    key = make_key()
    train_file = upload(api, key, copy_rows(8))
    base = {"reward": EXACT_MATCH, "training": {"steps": 2, "prompts_per_step": 2}}
    body = run_spec(str(tiny_model_dir), train_file, base, change)
    assert_error(api.post("/v1/runs", headers=auth(key), json=body), 422, "invalid_request", needle)
    assert api.get("/v1/runs", headers=auth(key)).json()["data"] == []  # nothing stored


def dry_run(**changes) -> dict:
    group = {"prompt": "a=", "completions": ["a", "b"], "rewards": [1.0, 0.0], "beta": 0.1}
    return {"model": {"run_id": "run_x"}, **group, **changes}


PAST_THE_LIMITS = [  # (method, path, request arguments, field named in the 422)
    ("GET", f"/v1/runs/run_{'x' * 61}", {}, "run_id"),
    ("GET", f"/v1/files/file_{'x' * 60}", {}, "file_id"),
    ("GET", f"/v1/runs/run_x/rescores/rsc_{'x' * 61}", {}, "rescore_id"),
    ("GET", f"/v1/runs?after=run_{'x' * 61}", {}, "after"),
    ("GET", "/v1/runs?limit=101", {}, "limit"),
    ("GET", f"/v1/runs/run_x/events?after={2**31}", {}, "after"),
    ("GET", f"/v1/runs/run_x/events/stream?since_step={2**31}", {}, "since_step"),
    (
        "GET",
        "/v1/runs/run_x/events/stream",
        {"headers": {"Last-Event-ID": str(2**31)}},
        "last-event-id",
    ),
    ("GET", f"/v1/runs/run_x/metrics?since_step={2**31}", {}, "since_step"),
    ("GET", f"/v1/runs/run_x/metrics?names={'loss,' * 2000}", {}, "names"),
    ("GET", f"/v1/runs/run_x/samples?step={2**40}", {}, "step"),
    ("GET", "/v1/runs", {"headers": {"Authorization": "Bearer " + "k" * 1000}}, "authorization"),
    ("POST", "/v1/runs", {"json": {}, "headers": {"Idempotency-Key": "k" * 201}}, "idempotency"),
    ("POST", "/v1/gvpo:dry_run", {"json": dry_run(rewards=[1e10, 0.0])}, "rewards"),
    (
        "POST",
        "/v1/gvpo:dry_run",
        {"content": json.dumps(dry_run(rewards=[1.0, float("nan")]))},
        "rewards",
    ),
    ("POST", "/v1/gvpo:dry_run", {"json": dry_run(beta=1e5)}, "beta"),
    ("POST", "/v1/gvpo:dry_run", {"json": dry_run(prompt="a\x00")}, "NUL"),
    (
        "POST",
        "/v1/gvpo:dry_run",
        {"json": dry_run(completions=["a", "b" * 100_001])},
        "completions",
    ),
    ("POST", "/v1/gvpo:dry_run", {"json": dry_run(model={"run_id": "r" * 65})}, "model.run_id"),
    ("POST", "/v1/runs/run_x/groups", {"json": {"groups": [{}], "more": 1}}, "more"),
    (
        "POST",
        "/v1/runs/run_x/rescore",
        {
            "content": '{"reward": {"type": "composite", "components": [{"type": "builtin", '
            '"name": "exact_match", "weight": Infinity}]}}'
        },
        "weight",
    ),
]


@pytest.mark.both_backends
@pytest.mark.parametrize("method, path, request_args, field", PAST_THE_LIMITS)
def test_a_request_past_a_limit_is_a_422_naming_the_field(
    api, make_key, method, path, request_args, field
):
    args = dict(request_args)
    headers = {"Content-Type": "application/json", **auth(make_key()), **args.pop("headers", {})}
    resp = api.request(method, path, headers=headers, **args)
    assert_error(resp, 422, "invalid_request", field)


def multipart(filename: bytes, content: bytes) -> bytes:
    """An upload's body with the file's name as given (httpx would escape a NUL in it)."""
    return (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n--b--\r\n"
    )


@pytest.mark.both_backends
@pytest.mark.parametrize("filename", [b"n" * 256, b"a\x00b.jsonl"], ids=["long", "nul"])
def test_an_upload_whose_name_could_not_be_stored_is_a_400(api, make_key, settings, filename):
    key = make_key()
    resp = api.post(
        "/v1/files",
        content=multipart(filename, jsonl(copy_rows(2))),
        headers={**auth(key), "Content-Type": "multipart/form-data; boundary=b"},
    )
    assert_error(resp, 400, "bad_request", "name", "255 characters")
    assert api.get("/v1/files", headers=auth(key)).json()["data"] == []
    assert list(settings.files_dir.glob("*")) == []


@pytest.mark.both_backends
@pytest.mark.parametrize(
    "row, needle",
    [
        ({"prompt": "a=\x00", "completions": ["a", "b", "c", "d"]}, "NUL"),
        (
            {"prompt": "a=", "completions": ["a", "b", "c", "d"], "rewards": [10**400, 0, 0, 0]},
            "finite numbers",
        ),
    ],
    ids=["nul", "reward_past_any_float"],
)
def test_a_posted_group_the_run_could_not_hold_is_refused(
    api, settings, make_key, tiny_model_dir, row, needle
):
    run_id = submit(settings, tiny_model_dir, training={"offpolicy_fraction": 0.5})
    key = make_key("loop")  # submit()'s project
    resp = api.post(f"/v1/runs/{run_id}/groups", headers=auth(key), json={"groups": [row]})
    assert_error(resp, 422, "invalid_request", needle)
    assert api.get(f"/v1/runs/{run_id}/groups", headers=auth(key)).json()["pending"] == 0
