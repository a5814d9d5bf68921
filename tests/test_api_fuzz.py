"""Property-based: schemathesis generates requests for every operation in our OpenAPI schema
(bodies, queries, headers and path ids) and sends them to the app. No request may get a 5xx.

- Requests that fit the schema, with a valid API key: once as generated (unknown ids) and once
  aimed at a real file and run of the key's project; each documented response must match the
  schema.
- Requests that break it (schemathesis' negative mode: wrong types, values past the bounds,
  missing parts), with a valid key: refused with a 4xx.
- Requests without a key, and with a key that is no key of ours, fitting the schema or not:
  refused with a 4xx.

Few examples per operation, derandomized: the same requests on every run.
"""

import itertools
from collections.abc import Callable

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from service.main import create_app

from factories import SPEC_DEFAULTS, auth, copy_rows, run_spec, upload

CHECKS = [not_a_server_error, content_type_conformance, response_schema_conformance]
# Operations that a valid request takes to a worker, and no worker runs here: each would wait
# GVPO_WORKER_ANSWER_TIMEOUT_S for its 504. tests/test_graders_api.py sends them to one.
NEEDS_A_WORKER = {"POST /v1/graders:run", "POST /v1/fine_tuning/alpha/graders/run"}


@pytest.fixture
def app(settings):
    # The reaper is off: it would publish the generated runs to the broker in the background.
    return create_app(settings.model_copy(update={"reaper_interval_s": 0}))


def operations(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


def real_ids(app, key: str, model_dir) -> dict[str, str]:
    with TestClient(app) as client:
        file_id = upload(client, key, copy_rows(8), filename="t.jsonl")
        spec = run_spec(model_dir, file_id, SPEC_DEFAULTS)
        run, ended = (
            client.post("/v1/runs", headers=auth(key), json=spec).json()["id"] for _ in range(2)
        )
        client.post(f"/v1/runs/{ended}/cancel", headers=auth(key))
        return {"file_id": file_id, "run_id": run, "ended_run_id": ended}


def aim(case, ids: dict[str, str]) -> None:
    """Point the generated request at existing rows, so it gets past the 404s."""
    for name in case.path_parameters or {}:
        if name in ids:
            case.path_parameters[name] = ids[name]
    if ids and case.path.endswith("/events/stream"):  # a live run's stream never ends
        case.path_parameters["run_id"] = ids["ended_run_id"]
    if ids and isinstance(case.body, dict) and isinstance(case.body.get("dataset"), dict):
        case.body["dataset"]["train_file"] = ids["file_id"]


def fuzz(
    app,
    mode: GenerationMode,
    headers: Callable[[object], dict[str, str]],
    checks: list,
    examples: int,
    ids: dict[str, str] | None = None,
    skip: frozenset[str] | set[str] = frozenset(),
) -> set[int]:
    """Send `examples` generated requests to every operation but those in `skip`, with the
    headers that `headers(case)` gives; the statuses answered."""
    statuses = set()
    for operation in operations(app):
        if operation.label in skip:
            continue

        @given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis_settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def one(case):
            aim(case, ids or {})
            response = case.call_and_validate(headers=headers(case), checks=checks)
            statuses.add(response.status_code)

        try:
            one()
        except Unsatisfiable:  # nothing to break: an operation without parameters or body
            if mode == GenerationMode.POSITIVE:
                raise
    return statuses


def test_every_operation_is_in_the_schema(app):
    labels = {op.label for op in operations(app)}
    assert {
        "POST /v1/runs",
        "POST /v1/files",
        "POST /v1/runs/{run_id}/rewards",
        "POST /v1/runs/{run_id}/pause",
        "GET /v1/runs/{run_id}/metrics",
    } <= labels


def test_the_schema_declares_the_error_body_the_api_sends(app):
    # Not FastAPI's own 422 body (HTTPValidationError): a client generated from the document
    # must parse the {"error": ...} envelope of every failure.
    document = app.openapi()
    assert "HTTPValidationError" not in document["components"]["schemas"]
    envelope = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations_of_path in document["paths"].items():
        for method, operation in operations_of_path.items():
            if path in ("/healthz", "/readyz"):
                continue
            for status in ("4XX", "5XX"):
                body = operation["responses"][status]["content"]["application/json"]
                assert body["schema"] == envelope, (method, path, status)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("target", ["generated ids", "real ids"])
def test_no_server_error_and_responses_match_the_schema(app, make_key, tiny_model_dir, target):
    key = make_key()
    ids = real_ids(app, key, tiny_model_dir) if target == "real ids" else {}
    statuses = fuzz(
        app, GenerationMode.POSITIVE, lambda _: auth(key), CHECKS, 30, ids, NEEDS_A_WORKER
    )
    if ids:  # the aimed requests reached the handlers' own rules, not only the 404
        assert {200, 409, 422} <= statuses


@pytest.mark.both_backends  # values no schema allows reach the database's lookups
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_requests_that_break_the_schema_are_refused_never_a_server_error(app, make_key):
    key = make_key()
    statuses = fuzz(
        app,
        GenerationMode.NEGATIVE,
        lambda _: auth(key),
        [not_a_server_error],
        10,
        None,
        NEEDS_A_WORKER,  # a body pydantic takes though its schema's oneOf would not
    )
    assert 422 in statuses


def without_a_valid_key() -> Callable[[object], dict[str, str]]:
    """Headers for one request after another: no Authorization header, then a key that is no
    key of ours, in turn."""
    sent = itertools.count()

    def headers(case) -> dict[str, str]:
        if next(sent) % 2:
            return auth("gvpo_sk_" + "x" * 43)
        for name in [h for h in case.headers or {} if h.lower() == "authorization"]:
            del case.headers[name]  # a generated Authorization header would be a key of sorts
        return {}

    return headers


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    "mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["fitting", "breaking"]
)
def test_requests_without_a_valid_key_are_refused_never_a_server_error(app, make_key, mode):
    make_key()  # a project with a key exists: another key is refused all the same
    statuses = fuzz(app, mode, without_a_valid_key(), [not_a_server_error], 6)
    assert 401 in statuses
