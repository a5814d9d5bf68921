"""A fresh API process answers its very first requests as it answers any later one: concurrent
run submissions reaching it before anything else (no health check, no earlier request) are all
created. Each request runs in its own thread, so anything first loaded on the request path (a
module imported inside a function, a library's lazy import, an engine built on first use) is
loaded by several threads at once; one of them used to see it half-made and answer 500."""

import io
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service.auth.service import create_api_key
from service.db import session_scope
from service.files.service import create_file
from service.stack import listen_socket, stack_env

from factories import (
    SERVER_START_S,
    SPEC_DEFAULTS,
    auth,
    broker_run_ids,
    copy_rows,
    jsonl,
    run_spec,
)

SUBMISSIONS = 8


@pytest.mark.both_backends
def test_the_first_concurrent_submissions_to_a_fresh_api_are_all_created(
    tmp_path, settings, tiny_model_dir
):
    with session_scope(settings.resolved_database_url) as session:
        project, key = create_api_key(session, "fresh", settings.api_key_pepper)
        rows = io.BytesIO(jsonl(copy_rows(8)))
        train_file = create_file(session, settings, project, rows, "t.jsonl", "train").id
    spec = run_spec(tiny_model_dir, train_file, SPEC_DEFAULTS)
    log = tmp_path / "api.log"
    # The socket listens before the API process exists: the submissions wait in its backlog
    # and are the first requests the new interpreter serves.
    with listen_socket("127.0.0.1", 0) as sock, log.open("wb") as api_log:
        # No reaper: each run must be on the broker because its own request put it there.
        port = sock.getsockname()[1]
        live = settings.model_copy(update={"api_port": port, "reaper_interval_s": 0})
        api = subprocess.Popen(
            [sys.executable, "-m", "service.stack", str(sock.fileno())],
            env=stack_env(live),
            pass_fds=(sock.fileno(),),
            stdout=api_log,
            stderr=subprocess.STDOUT,
        )
    try:
        with (
            httpx.Client(
                base_url=f"http://127.0.0.1:{port}", headers=auth(key), timeout=4 * SERVER_START_S
            ) as http,
            ThreadPoolExecutor(SUBMISSIONS) as pool,
        ):
            answers = list(pool.map(lambda _: http.post("/v1/runs", json=spec), range(SUBMISSIONS)))
    finally:
        api.terminate()
        api.wait(timeout=30)
    errors = [a.text for a in answers if a.status_code != 201]
    if errors:
        print(log.read_text())  # whole, with the failure: an assertion message is cut short
    assert [a.status_code for a in answers] == [201] * SUBMISSIONS, errors
    ids = sorted(a.json()["id"] for a in answers)
    assert sorted(broker_run_ids(settings)) == ids, log.read_text()
