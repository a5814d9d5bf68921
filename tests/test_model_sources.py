"""A hostile tenant and model weights: project B tries every spec field that names weights with
project A's checkpoint folders, and learns nothing about which server paths exist; the worker
refuses the same folders on its own before it loads a byte; project A's own responses carry no
server path; the operator's registered base models work for every project. A relative folder
is refused for being one (it would be read on the server, not where the tenant is), and the CLI
sends it absolute."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from sqlalchemy import update

from gvpo_client.paths import with_absolute_paths
from service.contract.sources import refusal, relative_refusal
from service.contract.states import RunStatus
from service.contract.storage import CheckpointKind
from service.db import session_scope
from service.models import Run
from service.stack import stack_env
from workers.errors import RunError
from workers.model_source import loadable, loaded_spec
from workers.records import RunRecorder

from factories import assert_error, auth, copy_rows, run_spec, submit, upload
from services import cli, cli_refusal, serve_api

pytestmark = pytest.mark.both_backends


@pytest.fixture
def a_checkpoint(settings, tiny_model_dir) -> SimpleNamespace:
    """Project "loop" (A): an ended run with a whole-model checkpoint where workers keep them."""
    run_id = submit(settings, tiny_model_dir)
    folder = settings.runs_dir / run_id / "checkpoints" / "step_000001"
    shutil.copytree(tiny_model_dir, folder)
    recorder = RunRecorder(settings, run_id, "worker-a")
    recorder.claim()
    recorder.record_checkpoint(1, str(folder), 1, CheckpointKind.FULL, None)
    recorder.finish(RunStatus.SUCCEEDED, "done")
    return SimpleNamespace(run_id=run_id, folder=folder, id=f"ckpt_{run_id[4:]}_1")


def forms_of(folder, settings, tmp_path) -> list[str]:
    """Ways to write a folder of the data directory: as it is, relative to here, through `..`
    from a model root, through a symbolic link under a root, as a URL; the data directory."""
    link = tmp_path / "innocent-looking-model"
    link.symlink_to(folder)
    relative = os.path.relpath(folder)
    return [
        str(folder),
        relative if relative.startswith(".") else f"./{relative}",
        f"{tempfile.gettempdir()}/../{str(folder).lstrip('/')}",
        str(link),
        f"file://{folder}",
        str(settings.resolved_data_dir),
        str(folder.parent),
    ]


def test_no_field_loads_another_projects_weights(
    api, make_key, settings, a_checkpoint, tiny_model_dir, tmp_path
):
    b = make_key("team-b")
    train = upload(api, b, copy_rows(8))

    def refused(model: dict, field: str) -> dict:
        body = {**run_spec("", train), "model": model}
        error = assert_error(
            api.post("/v1/runs", headers=auth(b), json=body), 422, "invalid_request"
        )
        assert [f["field"] for f in error["details"]["fields"]] == [field], error
        return error

    for form in forms_of(a_checkpoint.folder, settings, tmp_path):
        refused({"path": form}, "model.path")
        refused({"path": str(tiny_model_dir), "adapter": form, "lora": {}}, "model.adapter")
    error = refused({"checkpoint": a_checkpoint.id}, "model.checkpoint")
    assert error["message"].endswith(f"no checkpoint {a_checkpoint.id!r} in this project")
    with session_scope(settings.resolved_database_url) as session:
        assert session.query(Run).count() == 1  # A's run only


def test_a_refusal_says_the_same_whether_the_path_exists(api, make_key, settings, a_checkpoint):
    b = make_key("team-b")
    train = upload(api, b, copy_rows(8))
    folder = str(a_checkpoint.folder)
    bodies = [
        api.post("/v1/runs", headers=auth(b), json=run_spec(path, train)).json()
        for path in (folder, f"{folder}-missing", "/etc", "/no/such/folder")
    ]
    assert all(body == bodies[0] for body in bodies), bodies
    (problem,) = bodies[0]["error"]["details"]["fields"]
    assert problem["message"] == refusal("model.path")
    assert str(settings.resolved_data_dir) not in str(bodies[0])


def test_the_projects_own_responses_carry_no_server_path(api, make_key, settings, a_checkpoint):
    a = make_key("loop")  # submit()'s project
    run = api.get(f"/v1/runs/{a_checkpoint.run_id}", headers=auth(a)).json()
    train = run["spec"]["dataset"]["train_file"]
    body = {**run_spec("", train), "model": {"checkpoint": a_checkpoint.id}}
    started = api.post("/v1/runs", headers=auth(a), json=body)
    assert started.status_code == 201, started.text
    assert started.json()["spec"]["model"]["path"] is None
    data_dir = str(settings.resolved_data_dir)
    for path in (
        "/v1/runs",
        f"/v1/runs/{started.json()['id']}",
        f"/v1/runs/{a_checkpoint.run_id}/checkpoints",
        f"/v1/runs/{a_checkpoint.run_id}/events",
    ):
        resp = api.get(path, headers=auth(a))
        assert resp.status_code == 200 and data_dir not in resp.text, (path, resp.text)


def test_a_failure_names_no_server_folder(api, make_key, settings, a_checkpoint):
    """A run from the project's checkpoint whose files went missing fails on the worker: its
    event and error name the folder as the project knows it, not where the server keeps it."""
    from workers.execute import execute_run

    key = make_key("loop")
    train = api.get(f"/v1/runs/{a_checkpoint.run_id}", headers=auth(key)).json()
    body = {
        **run_spec("", train["spec"]["dataset"]["train_file"]),
        "model": {"checkpoint": a_checkpoint.id},
    }
    started = api.post("/v1/runs", headers=auth(key), json=body).json()["id"]
    shutil.rmtree(a_checkpoint.folder)
    assert execute_run(settings, started, "worker-a") == RunStatus.FAILED
    run = api.get(f"/v1/runs/{started}", headers=auth(key))
    events = api.get(f"/v1/runs/{started}/events", headers=auth(key))
    assert "<model.path>" in run.json()["error"], run.text
    for resp in (run, events):
        assert str(settings.resolved_data_dir) not in resp.text, resp.text


def test_the_worker_checks_the_folders_again(settings, tiny_model_dir, a_checkpoint, tmp_path):
    """A run whose recorded folders name another project's checkpoint (recorded under older
    rules, say, or a link made since) fails before its worker reads them."""
    own = a_checkpoint.run_id
    record = run_of(settings, own)
    assert loaded_spec(settings, own, record).model.path == str(tiny_model_dir)
    theirs = submit_as(settings, tiny_model_dir, "team-b")
    for folder in forms_of(a_checkpoint.folder, settings, tmp_path)[:4]:
        with session_scope(settings.resolved_database_url) as session:
            session.execute(
                update(Run).where(Run.id == theirs).values(model_source={"path": folder})
            )
        with pytest.raises(RunError, match="registered"):
            loaded_spec(settings, theirs, run_of(settings, theirs))
    # A's own run from its own checkpoint passes.
    with session_scope(settings.resolved_database_url) as session:
        session.execute(
            update(Run)
            .where(Run.id == own)
            .values(model_source={"path": str(a_checkpoint.folder), "adapter": None})
        )
    assert loaded_spec(settings, own, record).model.path == str(a_checkpoint.folder)


def run_of(settings, run_id: str) -> dict:
    with session_scope(settings.resolved_database_url) as session:
        return dict(session.get(Run, run_id).spec)


def submit_as(settings, model_dir, project: str) -> str:
    """A queued run of `project` (submit() makes them for project "loop")."""
    run_id = submit(settings, model_dir)
    with session_scope(settings.resolved_database_url) as session:
        from service.models import Project

        other = session.query(Project).filter_by(name=project).one_or_none() or Project(
            name=project
        )
        session.add(other)
        session.flush()
        session.get(Run, run_id).project_id = other.id
    return run_id


def test_a_hub_id_is_never_read_as_a_folder_of_the_worker(settings, tiny_model_dir, monkeypatch):
    """`runs/<id>` is a well-formed hub id: relative to a worker in the data directory it would
    be a run's folder; the worker asks the hub (here unreachable) instead."""
    shutil.copytree(tiny_model_dir, settings.runs_dir / "run_x")
    monkeypatch.chdir(settings.resolved_data_dir)
    with pytest.raises(RunError, match="cannot fetch model 'runs/run_x' from the hub"):
        loadable("runs/run_x")


def test_registered_base_models(api, make_key, settings, tiny_model_dir, tmp_path):
    """`gvpo models add` registers a folder by name; every project's runs may name it, and see
    the name only. The data directory cannot be registered."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "operators-models" / "tiny")
    assert cli(settings, "models", "add", "tiny-base", str(model)).endswith(str(model))
    assert cli(settings, "models", "list") == f"tiny-base\t{model}"
    key = make_key("team-b")
    train = upload(api, key, copy_rows(8))
    created = api.post("/v1/runs", headers=auth(key), json=run_spec("tiny-base", train))
    assert created.status_code == 201, created.text
    assert created.json()["spec"]["model"]["path"] == "tiny-base"
    assert str(model) not in created.text
    with session_scope(settings.resolved_database_url) as session:
        assert session.get(Run, created.json()["id"]).model_source["path"] == str(model)
    refused = cli_refusal(settings, "models", "add", "x", str(settings.runs_dir))
    assert "inside the data directory" in refused
    cli(settings, "models", "remove", "tiny-base")
    # Unregistered, the name reads as a hub id: nothing on this machine stands behind it.
    again = api.post("/v1/runs", headers=auth(key), json=run_spec("tiny-base", train))
    with session_scope(settings.resolved_database_url) as session:
        assert session.get(Run, again.json()["id"]).model_source["path"] == "tiny-base"


def test_a_relative_folder_is_refused_for_being_one(
    api, make_key, settings, tiny_model_dir, monkeypatch
):
    """Each form, in model.path and model.adapter, whether or not the folder exists relative
    to the API's directory: one message, which says why; nothing is recorded."""
    monkeypatch.chdir(tiny_model_dir.parent)
    key = make_key()
    train = upload(api, key, copy_rows(8))
    name, up = tiny_model_dir.name, f"../{tiny_model_dir.parent.name}"
    forms = [f"./{name}", f"{name}/", f"{up}/{name}", ".", "~", "~/x", "./missing", "a/b/c"]
    bodies = []
    for form in forms:
        for model, field in (
            ({"path": form}, "model.path"),
            ({"path": str(tiny_model_dir), "adapter": form, "lora": {}}, "model.adapter"),
        ):
            resp = api.post(
                "/v1/runs", headers=auth(key), json={**run_spec("", train), "model": model}
            )
            error = assert_error(resp, 422, "invalid_request", "must be an absolute path")
            assert error["details"]["fields"] == [
                {"field": field, "message": relative_refusal(field)}
            ], (form, error)
            bodies.append((field, resp.json()))
    for field in ("model.path", "model.adapter"):
        assert len({str(body) for f, body in bodies if f == field}) == 1
    with session_scope(settings.resolved_database_url) as session:
        assert session.query(Run).count() == 0


def test_a_bare_name_is_a_hub_id_even_beside_a_folder_of_that_name(
    api, make_key, settings, tiny_model_dir, monkeypatch
):
    monkeypatch.chdir(tiny_model_dir.parent)
    key = make_key()
    train = upload(api, key, copy_rows(8))
    created = api.post("/v1/runs", headers=auth(key), json=run_spec(tiny_model_dir.name, train))
    assert created.status_code == 201, created.text
    with session_scope(settings.resolved_database_url) as session:
        source = session.get(Run, created.json()["id"]).model_source
    assert source["path"] == tiny_model_dir.name


@pytest.mark.one_backend("sqlite")  # the CLI's, not the database's
def test_the_cli_sends_a_relative_folder_absolute_from_where_it_runs(
    settings, make_key, tiny_model_dir, tmp_path
):
    """`gvpo submit ../specs/run.yaml` in work/, the spec saying ./tiny: the run is recorded with
    work/tiny (the current directory's, not the spec file's or the API's)."""
    work, specs = tmp_path / "work", tmp_path / "specs"
    shutil.copytree(tiny_model_dir, work / "tiny")
    specs.mkdir()
    with serve_api(settings) as live:
        url = f"http://127.0.0.1:{live.api_port}"
        key = make_key()
        with httpx.Client(base_url=url, headers=auth(key), timeout=60) as http:
            train = upload(http, None, copy_rows(8))
            (specs / "run.yaml").write_text(
                json.dumps({**run_spec("./tiny", train), "name": "relative"})  # JSON is YAML
            )
            out = subprocess.run(
                [sys.executable, "-m", "service.cli", "submit", "../specs/run.yaml"],
                cwd=work,
                env={**stack_env(live), "GVPO_API_URL": url, "GVPO_API_KEY": key},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert out.returncode == 0, out.stderr
            run = http.get("/v1/runs", params={"limit": 1}).json()["data"][0]
    expected = str(work.resolve() / "tiny")
    assert run["name"] == "relative" and run["spec"]["model"]["path"] == expected, run
    with session_scope(settings.resolved_database_url) as session:
        assert session.get(Run, run["id"]).model_source["path"] == expected


def test_the_python_client_sends_each_relative_folder_absolute_and_nothing_else(tmp_path):
    sent = {
        "./tiny": str(tmp_path / "tiny"),
        "tiny/": str(tmp_path / "tiny"),
        "../x": str(tmp_path.parent / "x"),
        "~/x": str(Path.home() / "x"),
        "/abs/tiny": "/abs/tiny",  # absolute already
        "tiny": "tiny",  # a registered model or a hub id
        "org/name": "org/name",
        "s3://bucket/m": "s3://bucket/m",  # refused by the API, not rewritten
    }
    for form, absolute in sent.items():
        spec = {"name": "x", "model": {"path": form, "adapter": form}}
        assert with_absolute_paths(spec, tmp_path) == {
            "name": "x",
            "model": {"path": absolute, "adapter": absolute},
        }, form
    assert with_absolute_paths({"model": "./tiny"}) == {"model": "./tiny"}  # the API says why
