"""Webhook secrets at rest: the database holds them only encrypted (GVPO_ENCRYPTION_KEY); the
API and the worker open them to verify and sign; a wrong key is a clear error, never a wrong
secret; and the key rotates without losing a secret."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import text

from gvpo_client.signing import HEADER, sign
from service.cli import main
from service.config import get_settings
from service.contract.sealing import SealingError
from service.db import session_scope
from service.main import create_app
from service.models import Project, Run
from service.rewards.service import rotate_secret
from workers.records import RunRecorder

from factories import (
    EXACT_MATCH,
    SPEC_DEFAULTS,
    assert_error,
    auth,
    copy_rows,
    run_spec,
    submit,
    upload,
    webhook_secret,
)

pytestmark = pytest.mark.both_backends

OLD_KEY, NEW_KEY = "old-encryption-key-" + "o" * 32, "new-encryption-key-" + "n" * 32


def stored(settings, run_id: str) -> tuple[str, str | None]:
    """The run's secret columns as the database holds them, read by plain SQL."""
    with session_scope(settings.resolved_database_url) as session:
        return tuple(
            session.execute(
                text(
                    "SELECT webhook_secret_encrypted, previous_webhook_secret_encrypted "
                    "FROM runs WHERE id = :id"
                ),
                {"id": run_id},
            ).one()
        )


def database_files(settings) -> bytes:
    """SQLite: the bytes of the database file and its write-ahead log."""
    db = Path(settings.resolved_database_url.removeprefix("sqlite:///"))
    return b"".join(p.read_bytes() for p in (db, db.with_name(db.name + "-wal")) if p.exists())


def callback(api, run_id: str, secret: str, sample_id: str):
    body = json.dumps(
        {"request_id": "rq_1", "rewards": [{"sample_id": sample_id, "reward": 0.5}]}
    ).encode()
    return api.post(
        f"/v1/runs/{run_id}/rewards", content=body, headers={HEADER: sign(secret, body)}
    )


def test_webhook_secrets_are_stored_only_encrypted(api, settings, make_key, tiny_model_dir):
    key, mine = make_key(), "whsec_my_own_secret_0123456789"
    body = run_spec(
        tiny_model_dir,
        upload(api, key, copy_rows(4), filename="t.jsonl"),
        SPEC_DEFAULTS,
        reward=EXACT_MATCH,
        webhook_secret=mine,
    )
    created = api.post("/v1/runs", headers=auth(key), json=body)
    assert created.status_code == 201 and created.json()["webhook_secret"] == mine
    run_id = created.json()["id"]
    current, previous = stored(settings, run_id)
    assert mine not in current and previous is None
    assert settings.sealer.open(current) == mine
    rotated = api.post(f"/v1/runs/{run_id}/webhook-secret/rotate", headers=auth(key))
    new = rotated.json()["webhook_secret"]
    current, previous = stored(settings, run_id)
    assert new not in current and mine not in previous
    assert (settings.sealer.open(current), settings.sealer.open(previous)) == (new, mine)
    if settings.resolved_database_url.startswith("sqlite"):
        on_disk = database_files(settings)
        assert mine.encode() not in on_disk and new.encode() not in on_disk


def test_the_worker_signs_with_the_secret_the_api_verifies(api, settings, tiny_model_dir):
    run_id = submit(settings, tiny_model_dir)
    recorder = RunRecorder(settings, run_id, "worker-a")
    recorder.open_reward_request("rq_1", 1, ["smp_a"])
    assert callback(api, run_id, recorder.webhook_secret(), "smp_a").json()["accepted"] == 1


def test_a_wrong_key_is_a_clear_error_not_a_wrong_secret(settings, tiny_model_dir):
    run_id = submit(settings, tiny_model_dir)
    RunRecorder(settings, run_id, "worker-a").open_reward_request("rq_1", 1, ["smp_a"])
    secret = webhook_secret(settings, run_id)
    wrong = settings.model_copy(update={"encryption_key": NEW_KEY})
    with pytest.raises(SealingError, match="does not open with the keys in GVPO_ENCRYPTION_KEY"):
        RunRecorder(wrong, run_id, "worker-a").webhook_secret()
    with TestClient(create_app(wrong)) as api:  # the server's fault: 503, nothing stored
        resp = callback(api, run_id, secret, "smp_a")
        assert_error(resp, 503, "unavailable", "cannot be read", "GVPO_ENCRYPTION_KEY")
    with TestClient(create_app(settings)) as api:
        assert callback(api, run_id, secret, "smp_a").json()["accepted"] == 1


def reencrypt(settings, keys: str):
    env = {
        "GVPO_DATA_DIR": str(settings.resolved_data_dir),
        "GVPO_DATABASE_URL": settings.resolved_database_url,
        "GVPO_ENCRYPTION_KEY": keys,
    }
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(main, ["db", "reencrypt"], env=env)
    finally:
        get_settings.cache_clear()


def test_the_encryption_key_rotates_without_losing_a_secret(settings, tiny_model_dir):
    old = settings.model_copy(update={"encryption_key": OLD_KEY})
    first = submit(old, tiny_model_dir)
    with session_scope(settings.resolved_database_url) as session:  # mid webhook rotation too
        project = session.get(Project, session.get(Run, first).project_id)
        rotate_secret(session, old, project, first)
    rotating = settings.model_copy(update={"encryption_key": f"{NEW_KEY}, {OLD_KEY}"})
    second = submit(rotating, tiny_model_dir)
    secrets = {run_id: stored(settings, run_id) for run_id in (first, second)}
    opened = {
        run_id: tuple(s and rotating.sealer.open(s) for s in sealed)
        for run_id, sealed in secrets.items()
    }
    with pytest.raises(SealingError):  # the new run was sealed under the new key
        webhook_secret(old, second)

    result = reencrypt(settings, f"{NEW_KEY},{OLD_KEY}")
    assert result.exit_code == 0, result.output
    assert "re-encrypted the webhook secrets of 2 runs" in result.output
    new = settings.model_copy(update={"encryption_key": NEW_KEY})
    for run_id, plain in opened.items():
        assert tuple(s and new.sealer.open(s) for s in stored(settings, run_id)) == plain
    assert opened[first][1] is not None  # the previous secret was re-encrypted as well

    wrong = reencrypt(settings, OLD_KEY)  # no longer opens anything: refused, nothing written
    assert wrong.exit_code == 1 and "does not open with the keys" in wrong.output
