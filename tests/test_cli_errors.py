"""What a user sees when a `gvpo` command fails, through the real command (`python -m
service.cli` in a subprocess): a message that says what happened and what to do, an exit code
(1 an error, 2 a usage mistake, 130 Ctrl-C), and no traceback unless GVPO_DEBUG=1 asks for one.
Against an API that is not there, a live one, and a proxy that answers 502; and `gvpo up`
refusing a data directory or a port another stack uses."""

import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from starlette.responses import PlainTextResponse

from service.auth.service import create_api_key
from service.config import Settings
from service.contract.states import TERMINAL
from service.db import session_scope
from service.migrate import upgrade
from service.models import Run
from service.stack import stack_env

from factories import (
    STACK_RUN,
    WORKER_S,
    auth,
    copy_rows,
    run_spec,
    upload,
    wait_for_run,
    wait_until,
)
from services import (
    ThreadServer,
    closed_port,
    gvpo_up,
    process_tree,
    serve_api,
    stack_settings,
)

CLI_S = 60  # one command, on a loaded machine


def gvpo(url: str, key: str | None, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`gvpo ARGS` as a user's shell runs it, against the API at `url` with `key`."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=_env(url, key, **env),
        capture_output=True,
        text=True,
        timeout=CLI_S,
    )


def _env(url: str, key: str | None, **env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("GVPO_DEBUG", "GVPO_API_KEY")}
    return {**base, "GVPO_API_URL": url, **({"GVPO_API_KEY": key} if key else {}), **env}


def refused(out: subprocess.CompletedProcess, code: int = 1) -> str:
    """The standard error of a command that failed as a user should see it."""
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    return out.stderr


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The API, served in this process on SQLite, with a project's key and a queued run of
    that project that no worker takes."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("live"), grpc_port=0, reaper_interval_s=0)
    upgrade(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as session:
        project, key = create_api_key(session, "cli", settings.api_key_pepper)
        run = Run(
            project_id=project.id,
            spec={},
            total_steps=10,
            webhook_secret_encrypted=settings.sealer.seal("unused"),
        )
        session.add(run)
        session.flush()
        run_id = run.id
    with serve_api(settings) as served:
        url = f"http://127.0.0.1:{served.api_port}"
        yield SimpleNamespace(url=url, key=key, run_id=run_id, port=served.api_port)


@pytest.fixture
def spec_file(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "spec.yaml"
        path.write_text(text)
        return str(path)

    return write


def test_version_is_the_installed_distributions():
    out = gvpo("http://127.0.0.1:9", None, "--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"gvpo {version('gvpo-service')}"


# ---------------------------------------------------------------- refused before anything is sent


@pytest.mark.parametrize(
    "text, says",
    [
        ("model: {path: [unclosed\n", "is not valid YAML: line 2, column 1: "),
        ("- a list\n", "holds a list: a mapping of fields"),
        ("", "holds nothing: a mapping of fields"),
    ],
)
def test_a_document_that_is_no_spec_is_refused_in_one_line(spec_file, text, says):
    with closed_port() as port:  # never reached: the document is refused first
        said = refused(gvpo(f"http://127.0.0.1:{port}", "gvpo_sk_x", "submit", spec_file(text)))
    assert says in said and len(said.strip().splitlines()) == 1, said


def test_a_missing_file_is_a_usage_error(tmp_path):
    said = refused(gvpo("http://127.0.0.1:9", "gvpo_sk_x", "submit", str(tmp_path / "no.yaml")), 2)
    assert "no.yaml' does not exist" in said


def test_no_api_key_says_how_to_make_one():
    said = refused(gvpo("http://127.0.0.1:9", None, "runs", "list"))
    assert "set GVPO_API_KEY" in said and "gvpo api-key create" in said


# ---------------------------------------------------------------- no API, or a broken one


@pytest.mark.parametrize("command", [["runs", "list"], ["runs", "watch", "run_x"]])
def test_an_api_that_is_not_there_is_named_with_what_to_do(command):
    """`runs watch` too fails at once: it resumes a stream that broke, not one never made."""
    with closed_port() as port:
        url = f"http://127.0.0.1:{port}"
        said = refused(gvpo(url, "gvpo_sk_x", *command))
    assert f"cannot reach the API at {url}: is `gvpo up` running?" in said
    assert "GVPO_API_URL" in said and len(said.strip().splitlines()) == 1


def test_gvpo_debug_shows_the_traceback_and_the_message():
    with closed_port() as port:
        out = gvpo(f"http://127.0.0.1:{port}", "gvpo_sk_x", "runs", "list", GVPO_DEBUG="1")
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "httpx.ConnectError" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("Error: cannot reach the API")


def test_a_5xx_answer_says_to_try_again():
    """A proxy in front of an API that is down answers 502, in text, not the API's JSON."""

    async def bad_gateway(scope, receive, send):
        await PlainTextResponse("Bad Gateway", status_code=502)(scope, receive, send)

    with ThreadServer(bad_gateway, lifespan="off") as proxy:
        said = refused(gvpo(f"http://127.0.0.1:{proxy.port}", "gvpo_sk_x", "runs", "list"))
    assert "the API failed to answer (502 http_error: Bad Gateway); try again later" in said


# ---------------------------------------------------------------- the API's refusals


def test_a_wrong_key_is_refused_with_what_to_set(live):
    said = refused(gvpo(live.url, "gvpo_sk_wrong", "runs", "list"))
    assert "the API key was refused (401 unauthorized" in said and "GVPO_API_KEY" in said


def test_a_run_that_is_not_there_is_a_404_in_the_apis_words(live):
    said = refused(gvpo(live.url, live.key, "runs", "show", "run_nope"))
    assert "run_nope" in said and "(404 not_found)" in said
    assert len(said.strip().splitlines()) == 1


def test_an_unknown_field_is_named_once_with_the_field_it_is_closest_to(live, spec_file):
    spec = spec_file(
        "model: {path: ./tiny}\n"
        "dataset: {train_file: file_x}\n"
        "reward: {type: builtin, name: exact_match}\n"
        "algorithm: {betta: 0.1}\n"
    )
    said = refused(gvpo(live.url, live.key, "submit", spec))
    assert said.strip().splitlines() == [
        "Error: the API refused the request (422 invalid_request):",
        "  algorithm.betta: unknown field (did you mean beta?)",
    ]


def _connected(pid: int, port: int) -> bool:
    """Whether process `pid` holds a TCP connection to `port` (on IPv4 loopback)."""
    fds = Path(f"/proc/{pid}/fd")
    sockets = set()
    for fd in fds.iterdir() if fds.exists() else ():
        try:
            sockets.add(os.readlink(fd).removeprefix("socket:[").removesuffix("]"))
        except OSError:
            continue
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        _, _, remote, state, *_, inode = line.split()[:10]
        if state == "01" and inode in sockets and int(remote.split(":")[1], 16) == port:
            return True
    return False


def test_ctrl_c_stops_watching_and_says_how_to_come_back(live):
    watch = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "runs", "watch", live.run_id],
        env=_env(live.url, live.key),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a suite started in the background (CI, `make test &`) has SIGINT
        # ignored, and a child would inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_until(lambda: _connected(watch.pid, live.port), CLI_S, "gvpo runs watch to connect")
        watch.send_signal(signal.SIGINT)
        _, said = watch.communicate(timeout=CLI_S)
    finally:
        watch.kill()
    assert watch.returncode == 130 and "Traceback" not in said, said
    assert said.strip().splitlines()[-1] == (
        f"stopped watching; the run goes on: re-attach with `gvpo runs watch {live.run_id}`"
    )
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {live.key}"}) as http:
        assert http.get(f"/v1/runs/{live.run_id}").json()["status"] == "queued"


# ---------------------------------------------------------------- `gvpo up`


def test_a_second_gvpo_up_on_a_taken_folder_or_port_refuses_at_once(tmp_path, tiny_model_dir):
    """It starts nothing (no second worker on the data directory, no log), and the first
    stack serves on, its processes untouched: the run it is training trains on."""
    first = stack_settings(tmp_path / "first")
    up, url = gvpo_up(first)
    try:
        with session_scope(first.resolved_database_url) as session:
            _, key = create_api_key(session, "first", first.api_key_pepper)
        with httpx.Client(base_url=url, headers=auth(key), timeout=CLI_S) as http:
            train = upload(http, None, copy_rows(8))
            spec = run_spec(
                tiny_model_dir, train, STACK_RUN, training={"steps": 400}, rollout={"engine": "hf"}
            )
            run = http.post("/v1/runs", json=spec).json()
            wait_until(
                lambda: http.get(f"/v1/runs/{run['id']}").json()["step"] > 0,
                WORKER_S,
                "the first stack's run to train",
                every=0.3,
            )
            stack = process_tree(up.pid)
            port = int(url.rsplit(":", 1)[1])
            again = [
                (first, "another gvpo up (pid "),  # the same folder, on any port
                (
                    stack_settings(tmp_path / "second").model_copy(update={"api_port": port}),
                    f"cannot serve the API on 127.0.0.1:{port}: another process listens there",
                ),
            ]
            for settings, says in again:
                started = time.monotonic()
                said = refused(
                    subprocess.run(
                        [sys.executable, "-m", "service.cli", "up"],
                        env=stack_env(settings.model_copy(update={"grpc_port": 0})),
                        capture_output=True,
                        text=True,
                        timeout=CLI_S,
                    )
                )
                assert says in said, said
                assert time.monotonic() - started < CLI_S / 2
            assert not (tmp_path / "second" / "logs").exists()
            assert http.get("/readyz").status_code == 200
            assert process_tree(up.pid) == stack
            # Still its first worker's, training on; 400 steps outlast the refusals by far, and
            # a cancel ends the run then.
            before = http.get(f"/v1/runs/{run['id']}").json()["step"]
            wait_until(
                lambda: http.get(f"/v1/runs/{run['id']}").json()["step"] > before,
                WORKER_S,
                "the first stack's run to train on",
                every=0.3,
            )
            assert http.post(f"/v1/runs/{run['id']}/cancel").status_code == 200
            ended = wait_for_run(http, run["id"], TERMINAL, timeout=WORKER_S)
            assert ended["status"] == "cancelled" and ended["error"] is None, ended
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
