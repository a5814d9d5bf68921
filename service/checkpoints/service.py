"""Checkpoints of a run: listing, and packing one as a .tar.gz for download."""

import tarfile
import tempfile
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import NotFound
from service.models import Checkpoint, Project
from service.runs.service import get_run


def list_checkpoints(session: Session, project: Project, run_id: str) -> list[Checkpoint]:
    get_run(session, project, run_id)
    stmt = select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.step)
    return list(session.scalars(stmt))


def get_checkpoint(session: Session, project: Project, run_id: str, ckpt_id: str) -> Checkpoint:
    get_run(session, project, run_id)
    ckpt = session.get(Checkpoint, ckpt_id)
    if ckpt is None or ckpt.run_id != run_id:
        raise NotFound(f"no checkpoint {ckpt_id!r} in run {run_id}")
    if not Path(ckpt.path).is_dir():
        raise NotFound(f"checkpoint {ckpt_id} is recorded but its files are gone from {ckpt.path}")
    return ckpt


def pack_checkpoint(ckpt: Checkpoint) -> Path:
    """A temporary .tar.gz whose top folder is the checkpoint id; the caller deletes it."""
    fd, name = tempfile.mkstemp(prefix=f"{ckpt.id}-", suffix=".tar.gz")
    with open(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
        tar.add(ckpt.path, arcname=ckpt.id)
    return Path(name)
