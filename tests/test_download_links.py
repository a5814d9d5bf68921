"""Signed checkpoint download links (what the dashboard's download buttons use): a token that
works without the API key for 10 minutes, for one run, checkpoint and format only."""

import io
import tarfile
import time
from datetime import datetime

import pytest
from fastapi.testclient import TestClient

from gvpo_client import Client
from service.checkpoints.service import DOWNLOAD_LINK_TTL_S, download_token
from service.db import session_scope
from service.models import Run
from workers.execute import execute_run

from factories import assert_error, auth, submit

pytestmark = pytest.mark.both_backends


@pytest.fixture
def trained(settings, tiny_model_dir, make_key):
    """A finished run with two checkpoints (steps 3 and 6), and a key of its project."""
    run_id = submit(settings, tiny_model_dir, checkpoint={"keep_last": None})
    assert execute_run(settings, run_id, "worker-a") == "succeeded"
    with session_scope(settings.resolved_database_url) as session:
        project_id = session.get(Run, run_id).project_id
    return run_id, project_id, make_key("loop")  # submit() made the project "loop"


def checkpoint_ids(api, key: str, run_id: str) -> list[str]:
    listed = api.get(f"/v1/runs/{run_id}/checkpoints", headers=auth(key)).json()["data"]
    return [c["id"] for c in listed]


def members(archive: bytes) -> set[str]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return {name.split("/", 1)[-1] for name in tar.getnames()}


def test_a_signed_link_downloads_without_the_api_key(api, trained):
    run_id, _, key = trained
    ckpt = checkpoint_ids(api, key, run_id)[-1]
    resp = api.post(f"/v1/runs/{run_id}/checkpoints/{ckpt}/download-url", headers=auth(key))
    assert resp.status_code == 200, resp.text
    link = resp.json()
    url = f"/v1/runs/{run_id}/checkpoints/{ckpt}/download"
    assert link["url"].startswith(f"{url}?format=stored&token=")
    left = datetime.fromisoformat(link["expires_at"]).timestamp() - time.time()
    assert DOWNLOAD_LINK_TTL_S - 5 < left <= DOWNLOAD_LINK_TTL_S

    download = api.get(link["url"])  # no Authorization header
    assert download.status_code == 200 and download.headers["content-type"] == "application/gzip"
    assert {"model.safetensors", "config.json", "trainer_state.json"} <= members(download.content)
    # the route still takes the API key instead, and without either it is a 401
    assert api.get(url, headers=auth(key)).status_code == 200
    assert_error(api.get(url), 401, "unauthorized", "missing API key")

    client = Client("http://testserver", key)
    client.http = TestClient(api.app, headers=auth(key))
    made = client.download_url(run_id, ckpt)
    assert made["url"].split("token=")[0] == link["url"].split("token=")[0]
    assert api.get(made["url"]).status_code == 200


def test_expired_tampered_and_misused_tokens_are_401(api, settings, trained):
    run_id, project_id, key = trained
    first, last = checkpoint_ids(api, key, run_id)
    url = f"/v1/runs/{run_id}/checkpoints/{last}/download"

    def get(token: str, ckpt: str = last, fmt: str = "stored"):
        return api.get(
            f"/v1/runs/{run_id}/checkpoints/{ckpt}/download", params={"format": fmt, "token": token}
        )

    sign = lambda ckpt, expires, fmt="stored": download_token(  # noqa: E731
        settings.resolved_secret_key, project_id, run_id, ckpt, fmt, expires
    )
    now = int(time.time())
    assert get(sign(last, now + 60)).status_code == 200

    assert_error(get(sign(last, now - 1)), 401, "unauthorized", "expired")
    good = sign(last, now + 60)
    expires, signature = good.split(".")
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    for bad in (
        f"{expires}.{flipped}",  # signature changed
        f"{int(expires) + 3600}.{signature}",  # expiry pushed back
        sign(first, now + 60),
    ):  # issued for the other checkpoint
        assert_error(get(bad), 401, "unauthorized", "invalid download token")
    assert_error(get(good, ckpt=first), 401, "unauthorized", "invalid download token")
    assert_error(get(good, fmt="merged"), 401, "unauthorized", "invalid download token")
    wrong_key = download_token(b"another-key", project_id, run_id, last, "stored", now + 60)
    assert_error(get(wrong_key), 401, "unauthorized", "invalid download token")
    other_run = api.get(url.replace(run_id, "run_nope"), params={"token": good})
    assert_error(other_run, 401, "unauthorized", "invalid download token")
    for garbage in ("", "abc", "12.", ".abc", "١٢٣.abc", "9" * 40 + ".x"):
        assert_error(get(garbage), 401, "unauthorized", "download token")


def test_another_projects_checkpoint_gets_no_link(api, make_key, trained):
    run_id, _, key = trained
    ckpt = checkpoint_ids(api, key, run_id)[-1]
    other = make_key("team-b")
    resp = api.post(f"/v1/runs/{run_id}/checkpoints/{ckpt}/download-url", headers=auth(other))
    assert_error(resp, 404, "not_found", run_id)
    resp = api.post(f"/v1/runs/{run_id}/checkpoints/ckpt_nope/download-url", headers=auth(key))
    assert_error(resp, 404, "not_found", "ckpt_nope")
    resp = api.post(
        f"/v1/runs/{run_id}/checkpoints/{ckpt}/download-url",
        params={"format": "zip"},
        headers=auth(key),
    )
    assert_error(resp, 422, "invalid_request", "format")
    assert_error(
        api.post(f"/v1/runs/{run_id}/checkpoints/{ckpt}/download-url"), 401, "unauthorized"
    )
