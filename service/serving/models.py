"""Which weights a request's `model` names (DESIGN.md §v2.2), for the project that asks.

- `ckpt_…`: a checkpoint of one of the project's runs, a LoRA checkpoint merged into its base
  model first (by a worker, once, kept beside it: the merged download's folder).
- `run_…`: the newest weights the run has published (every serving.sync_every_steps steps and
  at its start); a later request sees newer ones as the run publishes them.

Anything else, or another project's id, is a 404; a model whose files are gone a 410; a run
that has published nothing (yet) a 409 that says why.
"""

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.checkpoints.service import merged_source
from service.config import Settings
from service.contract import storage
from service.contract.states import RunStatus
from service.contract.storage import CheckpointKind
from service.errors import Conflict, Gone, NotFound
from service.models import Checkpoint, Project, Run
from service.runs.service import run_spec

OWNER = "gvpo"


@dataclass(frozen=True)
class ServedModel:
    name: str  # the id the request named
    path: str  # a whole model folder (local, or a store URL)
    version: int  # the run step its weights are from
    run_id: str
    created: datetime
    # A checkpoint's folders (its own, and a LoRA one's merged model): while they are there, it
    # is what it was (service/serving/lookups.py keeps it a few seconds).
    folders: tuple[str, ...] = ()


def _unknown(name: str) -> NotFound:
    return NotFound(
        f"no model {name!r} in this project: a model is one of its checkpoints (ckpt_…) or "
        "runs (run_…); GET /v1/models lists them"
    )


def resolve(session: Session, settings: Settings, project: Project, name: str) -> ServedModel:
    if name.startswith("ckpt_"):
        return _checkpoint(session, settings, project, name)
    if name.startswith("run_"):
        return _run(session, project, name)
    raise _unknown(name)


def _checkpoint(session: Session, settings: Settings, project: Project, name: str) -> ServedModel:
    ckpt = session.get(Checkpoint, name)
    run = ckpt and session.get(Run, ckpt.run_id)
    if run is None or run.project_id != project.id:
        raise _unknown(name)
    if not storage.exists(ckpt.path):
        raise Gone(
            f"checkpoint {name}'s files are gone (checkpoint.keep_last removed them, or they "
            f"were deleted): serve a newer checkpoint of run {run.id}, or the run itself"
        )
    path = ckpt.path
    if ckpt.kind == CheckpointKind.LORA_ADAPTER:
        path = merged_source(session, settings, ckpt)
    folders = tuple(dict.fromkeys((ckpt.path, path)))
    return ServedModel(name, path, ckpt.step, run.id, ckpt.created_at, folders)


def _run(session: Session, project: Project, name: str) -> ServedModel:
    run = session.get(Run, name)
    if run is None or run.project_id != project.id:
        raise _unknown(name)
    if run.weights_path is None:
        if not run_spec(run).serving.sync_every_steps:
            raise Conflict(
                f"run {name} publishes no weights to serve (its serving.sync_every_steps is "
                "0): serve one of its checkpoints instead"
            )
        if run.status == RunStatus.QUEUED:
            raise Conflict(f"run {name} has not started: it publishes its weights when it does")
        raise Conflict(f"run {name} has published no weights (it stopped before it could)")
    if not storage.is_remote(run.weights_path) and not Path(run.weights_path).is_dir():
        raise Gone(f"the weights run {name} published are gone (its data was deleted)")
    return ServedModel(name, run.weights_path, run.weights_step or 0, run.id, run.created_at)


def listed(session: Session, project: Project) -> list[ServedModel]:
    """The project's servable models: runs that have published weights, then checkpoints,
    newest first (whether their files are still there is checked when one is asked for)."""
    runs = session.scalars(
        select(Run)
        .where(Run.project_id == project.id, Run.weights_path.is_not(None))
        .order_by(Run.created_at.desc())
    )
    ckpts = session.execute(
        select(Checkpoint, Run.id)
        .join(Run, Run.id == Checkpoint.run_id)
        .where(Run.project_id == project.id)
        .order_by(Checkpoint.created_at.desc())
    )
    return [
        ServedModel(r.id, r.weights_path, r.weights_step or 0, r.id, r.created_at) for r in runs
    ] + [ServedModel(c.id, c.path, c.step, run_id, c.created_at) for c, run_id in ckpts]
