"""Checkpoints in an object store (GVPO_CHECKPOINT_URL): a real S3-compatible server (moto's,
on a loopback port) holds them; the worker uploads, prunes and resumes from there, and the API
downloads from there. One test covers a file:// URL."""

import io
import itertools
import os
import tarfile
import tempfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from run_control import RESUMABLE_STEPS as STEPS
from run_control import kill_after_first_checkpoint, resumable
from safetensors.torch import load_file
from sqlalchemy import select

from service.auth.service import create_api_key
from service.config import Settings
from service.contract import storage
from service.db import session_scope
from service.main import create_app
from service.models import Checkpoint, RunEvent
from service.stack import stack_env
from workers import checkpointing
from workers.execute import execute_run
from workers.records import RunRecorder

from factories import auth, submit
from services import running_worker, start_moto

_buckets = itertools.count()


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on a loopback port, for the module."""
    server, url = start_moto()
    yield url
    server.terminate()
    server.wait(10)


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, tmp_path) -> str:
    """A fresh bucket; the AWS_* variables point this process and its children at moto."""
    import boto3

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    name = f"ckpt-test-{next(_buckets)}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def with_store(settings: Settings, url: str, **changes) -> Settings:
    return settings.model_copy(update={"checkpoint_url": url, **changes})


def bucket_files(bucket: str, run_id: str) -> dict[str, set[str]]:
    """{step folder: file names} under s3://<bucket>/ckpts/<run_id>."""
    import s3fs

    found: dict[str, set[str]] = {}
    for key in s3fs.S3FileSystem(skip_instance_cache=True).find(f"{bucket}/ckpts/{run_id}"):
        folder, name = key.split("/")[-2:]
        found.setdefault(folder, set()).add(name)
    return found


def checkpoint_paths(settings, run_id) -> dict[int, str]:
    with session_scope(settings.resolved_database_url) as session:
        return dict(
            session.execute(
                select(Checkpoint.step, Checkpoint.path).where(Checkpoint.run_id == run_id)
            ).all()
        )


def download(settings, run_id, step: int, fmt: str, scratch: Path) -> Path:
    """GET the checkpoint's archive from an API with these settings; returns where it was
    unpacked."""
    with session_scope(settings.resolved_database_url) as session:
        key = create_api_key(session, "loop", settings.api_key_pepper)[1]  # submit()'s project
    with TestClient(create_app(settings)) as client:
        listed = client.get(f"/v1/runs/{run_id}/checkpoints", headers=auth(key)).json()["data"]
        ckpt = next(c for c in listed if c["step"] == step)
        assert "path" not in ckpt  # the store's layout is the operator's
        resp = client.get(
            f"/v1/runs/{run_id}/checkpoints/{ckpt['id']}/download",
            params={"format": fmt},
            headers=auth(key),
        )
    assert resp.status_code == 200, resp.text
    with tarfile.open(fileobj=io.BytesIO(resp.content)) as tar:
        tar.extractall(scratch, filter="data")
    return scratch / ckpt["id"]


def test_run_keeps_its_checkpoints_in_the_bucket_only(
    settings, tiny_model_dir, bucket, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM

    s = with_store(settings, f"s3://{bucket}/ckpts")
    run_id = submit(
        s, tiny_model_dir, training={"steps": 6}, checkpoint={"every_steps": 2, "keep_last": 2}
    )
    assert execute_run(s, run_id, "worker-a") == "succeeded"

    url = f"s3://{bucket}/ckpts/{run_id}"
    assert checkpoint_paths(s, run_id) == {4: f"{url}/step_000004", 6: f"{url}/step_000006"}
    files = bucket_files(bucket, run_id)
    assert set(files) == {"step_000004", "step_000006"}  # step 2 pruned from the bucket too
    assert {
        "model.safetensors",
        "config.json",
        "optimizer.pt",
        "trainer_state.json",
        storage.COMPLETE,
    } <= files["step_000006"]
    assert not list((s.runs_dir / run_id).rglob("*.safetensors"))  # no local copy kept
    assert RunRecorder(s, run_id, "x").latest_checkpoint() == (6, f"{url}/step_000006")

    # The API fetches it into a temporary folder, packs it and removes both.
    scratch = tmp_path / "api-tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    unpacked = download(s, run_id, 6, "stored", tmp_path / "unpacked")
    assert list(scratch.iterdir()) == []
    model = AutoModelForCausalLM.from_pretrained(unpacked)
    assert model.config.vocab_size > 0


def test_killed_run_resumes_from_the_bucket_on_another_machine(
    settings, tiny_model_dir, bucket, tmp_path, monkeypatch
):
    url = f"s3://{bucket}/ckpts"
    monkeypatch.setenv("GVPO_CHECKPOINT_URL", url)  # for the child that gets killed
    s = with_store(settings, url)
    straight = resumable(s, tiny_model_dir, "sampling", None)
    assert execute_run(s, straight, "worker-a") == "succeeded"

    killed = resumable(s, tiny_model_dir, "sampling", None)
    kill_after_first_checkpoint(s, killed)
    # Another machine: the same database and store, an empty data dir.
    elsewhere = with_store(
        settings, url, data_dir=tmp_path / "other-machine", database_url=s.resolved_database_url
    )
    assert execute_run(elsewhere, killed, "worker-b") == "succeeded"

    with session_scope(s.resolved_database_url) as session:
        resumed = session.scalars(
            select(RunEvent).where(RunEvent.run_id == killed, RunEvent.type == "run.resumed")
        ).all()
    assert [e.data for e in resumed] == [{"step": 3}]
    assert not (elsewhere.runs_dir / killed / "checkpoint-cache" / "step_000003").exists()

    def final(run_id):
        local = storage.download(checkpoint_paths(s, run_id)[STEPS], tmp_path / run_id)
        return load_file(local / "model.safetensors")

    a, b = final(straight), final(killed)
    assert a.keys() == b.keys()
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-6


def test_lora_checkpoint_in_the_bucket_downloads_merged(settings, tiny_model_dir, bucket, tmp_path):
    from transformers import AutoModelForCausalLM

    s = with_store(settings, f"s3://{bucket}/ckpts")
    run_id = submit(
        s,
        tiny_model_dir,
        model={"lora": {"r": 4, "alpha": 8}},
        training={"steps": 2},
        checkpoint={"every_steps": 2},
    )
    assert execute_run(s, run_id, "worker-a") == "succeeded"
    assert "adapter_model.safetensors" in bucket_files(bucket, run_id)["step_000002"]

    with running_worker(s, tmp_path / "worker.log"):  # a worker on the store makes the merge
        unpacked = download(s, run_id, 2, "merged", tmp_path / "merged")
    assert (unpacked / "model.safetensors").exists()
    assert not (unpacked / "adapter_model.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(unpacked)
    # kept beside the checkpoint in the bucket: a second download needs no worker
    assert "model.safetensors" in bucket_files(bucket, run_id)["step_000002-merged"]
    again = download(s, run_id, 2, "merged", tmp_path / "again")
    merged = (unpacked / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == merged


def test_upload_failure_fails_the_run_naming_the_checkpoint(
    settings, tiny_model_dir, bucket, monkeypatch
):
    """The event names the checkpoint within the store, not the store's URL (the operator's:
    the worker's log has it)."""
    monkeypatch.setattr(checkpointing, "UPLOAD_BACKOFF_S", 0.0)
    s = with_store(settings, "s3://no-such-bucket-here/ckpts")
    run_id = submit(s, tiny_model_dir, training={"steps": 1})
    assert execute_run(s, run_id, "worker-a") == "failed"
    with session_scope(s.resolved_database_url) as session:
        types = [
            (e.type, e.message)
            for e in session.scalars(
                select(RunEvent).where(RunEvent.run_id == run_id).order_by(RunEvent.id)
            )
        ]
    url = f"<checkpoint store>/{run_id}/step_000001"
    assert [t for t, _ in types].count(
        "checkpoint.upload_retry"
    ) == checkpointing.UPLOAD_ATTEMPTS - 1
    assert types[-1][0] == "run.failed" and url in types[-1][1]
    assert "no-such-bucket-here" not in types[-1][1]
    assert "after 3 tries" in types[-1][1]
    assert checkpoint_paths(s, run_id) == {}


def test_file_url_store(settings, tiny_model_dir, tmp_path):
    root = tmp_path / "mounted-store"
    s = with_store(settings, f"file://{root}")
    run_id = submit(
        s, tiny_model_dir, training={"steps": 2}, checkpoint={"every_steps": 1, "keep_last": 1}
    )
    assert execute_run(s, run_id, "worker-a") == "succeeded"
    assert checkpoint_paths(s, run_id) == {2: f"file://{root}/{run_id}/step_000002"}
    assert sorted(p.name for p in (root / run_id).iterdir()) == ["step_000002"]
    assert (root / run_id / "step_000002" / "model.safetensors").exists()
    assert not list((s.runs_dir / run_id).rglob("*.safetensors"))
    unpacked = download(s, run_id, 2, "stored", tmp_path / "unpacked")
    assert (unpacked / "trainer_state.json").exists() and not (unpacked / storage.COMPLETE).exists()
    assert os.path.getsize(unpacked / "model.safetensors") > 0


def test_the_embedded_stack_passes_the_store_on(settings, monkeypatch):
    monkeypatch.delenv("GVPO_CHECKPOINT_URL", raising=False)
    assert "GVPO_CHECKPOINT_URL" not in stack_env(settings)
    assert stack_env(with_store(settings, "s3://b/p"))["GVPO_CHECKPOINT_URL"] == "s3://b/p"
