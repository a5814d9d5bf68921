"""Checkpoints of a run: listing, packing one as a .tar.gz for download, and signed download
links (a browser's plain link cannot send the API key). A checkpoint's path is a local folder or
a URL in the object store (settings.checkpoint_url); see service/contract/storage.py."""

import hashlib
import hmac
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.config import Settings
from service.contract import storage
from service.contract.storage import CheckpointKind
from service.contract.tasks import MERGE_TASK, MergeTask, queue_of
from service.dispatch import ask_worker
from service.errors import NotFound, Unauthorized
from service.models import Checkpoint, Project, Run
from service.runs.service import get_run

DOWNLOAD_LINK_TTL_S = 600


def list_checkpoints(session: Session, project: Project, run_id: str) -> list[Checkpoint]:
    get_run(session, project, run_id)
    stmt = select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.step)
    return list(session.scalars(stmt))


def get_checkpoint(session: Session, project: Project, run_id: str, ckpt_id: str) -> Checkpoint:
    get_run(session, project, run_id)
    ckpt = session.get(Checkpoint, ckpt_id)
    if ckpt is None or ckpt.run_id != run_id:
        raise NotFound(f"no checkpoint {ckpt_id!r} in run {run_id}")
    if not storage.exists(ckpt.path):
        raise NotFound(f"checkpoint {ckpt_id} is recorded but its files are gone")
    return ckpt


def pack_checkpoint(
    session: Session, settings: Settings, ckpt: Checkpoint, merged: bool = False
) -> Path:
    """A temporary .tar.gz whose top folder is the checkpoint id; the caller deletes it.

    merged=True turns a LoRA adapter checkpoint into a whole model (adapter merged into its base
    weights) that loads with AutoModelForCausalLM; a full checkpoint already is one. A worker on
    the run's queue makes the merge, once, and keeps it beside the checkpoint. A checkpoint in
    the object store is downloaded into a temporary folder first, removed after.
    """
    source = ckpt.path
    if merged and ckpt.kind == CheckpointKind.LORA_ADAPTER:
        source = merged_source(session, settings, ckpt)
    fd, name = tempfile.mkstemp(prefix=f"{ckpt.id}-", suffix=".tar.gz")
    try:
        with (
            open(fd, "wb") as raw,
            tarfile.open(fileobj=raw, mode="w:gz") as tar,
            tempfile.TemporaryDirectory() as tmp,
        ):
            tar.add(storage.fetch(source, Path(tmp) / "stored"), arcname=ckpt.id)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def merged_source(session: Session, settings: Settings, ckpt: Checkpoint) -> str:
    """Where the LoRA checkpoint's merged whole model is, asking a worker to make it first."""
    target = storage.merged_path(ckpt.path)
    if storage.exists(target):
        return target
    task = MergeTask(checkpoint_id=ckpt.id, checkpoint_path=ckpt.path, target=target)
    queue = queue_of(session.get(Run, ckpt.run_id).spec)
    session.commit()  # hold no database connection while the worker merges
    ask_worker(settings, MERGE_TASK, task, queue, f"merging checkpoint {ckpt.id}")
    return target


def download_token(
    key: bytes, project_id: str, run_id: str, ckpt_id: str, format: str, expires: int
) -> str:
    """The token: '<expiry, unix seconds>.<hex HMAC-SHA256 of project, run, checkpoint, format
    and expiry>'."""
    message = "\n".join((project_id, run_id, ckpt_id, format, str(expires))).encode()
    return f"{expires}.{hmac.new(key, message, hashlib.sha256).hexdigest()}"


def download_link(
    session: Session, settings: Settings, project: Project, run_id: str, ckpt_id: str, format: str
) -> tuple[str, datetime]:
    """A download URL (relative to the API's origin) that works without the API key for
    DOWNLOAD_LINK_TTL_S seconds, and its expiry."""
    get_checkpoint(session, project, run_id, ckpt_id)
    expires = int(time.time()) + DOWNLOAD_LINK_TTL_S
    token = download_token(
        settings.resolved_secret_key, project.id, run_id, ckpt_id, format, expires
    )
    query = urlencode({"format": format, "token": token})
    url = f"/v1/runs/{run_id}/checkpoints/{ckpt_id}/download?{query}"
    return url, datetime.fromtimestamp(expires, UTC)


def authorize_download(
    session: Session, settings: Settings, token: str, run_id: str, ckpt_id: str, format: str
) -> Project:
    """The project a download token was issued to, if it is genuine, unexpired and made for
    exactly this run, checkpoint and format."""
    expires, _, signature = token.partition(".")
    if not (token.isascii() and expires.isdigit() and len(expires) <= 12 and signature):
        raise Unauthorized(
            "malformed download token: ask for a new link "
            "(POST .../checkpoints/{ckpt}/download-url)"
        )
    run = session.get(Run, run_id)
    expected = run and download_token(
        settings.resolved_secret_key, run.project_id, run_id, ckpt_id, format, int(expires)
    )
    if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthorized(
            "invalid download token: it was not issued for this checkpoint and format"
        )
    if int(expires) < time.time():
        expired_at = datetime.fromtimestamp(int(expires), UTC).isoformat()
        raise Unauthorized(f"download link expired at {expired_at}: ask for a new one")
    return session.get(Project, run.project_id)
