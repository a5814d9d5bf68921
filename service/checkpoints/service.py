"""Checkpoints of a run: listing, and packing one as a .tar.gz for download."""

import tarfile
import tempfile
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import Conflict, NotFound
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


def pack_checkpoint(ckpt: Checkpoint, merged: bool = False) -> Path:
    """A temporary .tar.gz whose top folder is the checkpoint id; the caller deletes it.

    merged=True turns a LoRA adapter checkpoint into a whole model (adapter merged into its base
    weights) that loads with AutoModelForCausalLM; a full checkpoint already is one.
    """
    fd, name = tempfile.mkstemp(prefix=f"{ckpt.id}-", suffix=".tar.gz")
    with open(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
        if merged and ckpt.kind == "lora_adapter":
            with tempfile.TemporaryDirectory() as tmp:
                tar.add(_merge_adapter(ckpt, Path(tmp)), arcname=ckpt.id)
        else:
            tar.add(ckpt.path, arcname=ckpt.id)
    return Path(name)


def _merge_adapter(ckpt: Checkpoint, workdir: Path) -> Path:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    try:
        model = AutoPeftModelForCausalLM.from_pretrained(ckpt.path)
    except OSError as exc:  # the base model is not on this machine
        raise Conflict(f"cannot merge checkpoint {ckpt.id}: its base model could not be "
                       f"loaded by the API server ({exc}); download the adapter instead") from exc
    out = workdir / ckpt.id
    model.merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(ckpt.path).save_pretrained(out)
    return out
