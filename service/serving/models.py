"""Which weights a request's `model` names (DESIGN.md §v2.2), for the project that asks.

- `ckpt_…`: a checkpoint of one of the project's runs, a LoRA checkpoint merged into its base
  model first (by a worker, once, kept beside it: the merged download's folder).
- `run_…`: the run's newest weights: those it has published (every serving.sync_every_steps
  steps), or its newest checkpoint if that is newer; a later request sees newer ones as the run
  publishes them. Asking for a run's model is what makes it publish (workers/publish.py): a run
  nobody serves writes no weights beyond its checkpoints, and one that finished unserved is
  served from its last checkpoint.

Anything else, or another project's id, is a 404; a model whose files are gone a 410; a run
with nothing to serve (yet) a 409 that says why.
"""

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from service.checkpoints.service import merged_source
from service.config import Settings
from service.contract import storage
from service.contract.states import TERMINAL, RunStatus
from service.contract.storage import CheckpointKind
from service.errors import Conflict, Gone, NotFound
from service.models import Checkpoint, Project, Run
from service.models.base import utcnow
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
        return _run(session, settings, project, name)
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


def _run(session: Session, settings: Settings, project: Project, name: str) -> ServedModel:
    """The run's newest weights: those it published, or its newest checkpoint when that is
    newer (a run publishes only once its model has been asked for: a finished run nobody
    served has its final checkpoint)."""
    run = session.get(Run, name)
    if run is None or run.project_id != project.id:
        raise _unknown(name)
    if run.serving_asked_at is None and run.status not in TERMINAL and _publishing(run):
        _ask_for(session, run)
    ckpt = _newest_checkpoint(session, run)
    if ckpt is not None and (run.weights_step is None or ckpt.step > run.weights_step):
        served = _checkpoint(session, settings, project, ckpt.id)
        return ServedModel(name, served.path, ckpt.step, run.id, run.created_at)
    if run.weights_path is None:
        if not _publishing(run):
            raise Conflict(
                f"run {name} publishes no weights (its serving.sync_every_steps is 0) and has "
                "no checkpoint yet: serve it once it has one"
            )
        if run.status == RunStatus.QUEUED:
            raise Conflict(f"run {name} has not started: it has no weights to serve yet")
        if run.status in TERMINAL:
            raise Conflict(f"run {name} has no weights to serve (it stopped before it had any)")
        raise Conflict(
            f"run {name} publishes its weights at the end of its current step (asked for "
            "now): try again then"
        )
    if not storage.is_remote(run.weights_path) and not Path(run.weights_path).is_dir():
        raise Gone(f"the weights run {name} published are gone (its data was deleted)")
    return ServedModel(name, run.weights_path, run.weights_step or 0, run.id, run.created_at)


def _publishing(run: Run) -> bool:
    """Whether the run publishes weights at all (its spec is read only when this matters)."""
    return run_spec(run).serving.sync_every_steps > 0


def _ask_for(session: Session, run: Run) -> None:
    """Note that the run's model is wanted: from now on it publishes its weights."""
    session.execute(
        update(Run)
        .where(Run.id == run.id, Run.serving_asked_at.is_(None))
        .values(serving_asked_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()


def _newest_checkpoint(session: Session, run: Run) -> Checkpoint | None:
    return session.scalars(
        select(Checkpoint)
        .where(Checkpoint.run_id == run.id)
        .order_by(Checkpoint.step.desc())
        .limit(1)
    ).first()


def listed(session: Session, project: Project) -> list[ServedModel]:
    """The project's servable models: runs that have published weights or have a checkpoint,
    then checkpoints, newest first (whether their files are still there is checked when one is
    asked for)."""
    newest = (
        select(Checkpoint.run_id, func.max(Checkpoint.step).label("step"))
        .group_by(Checkpoint.run_id)
        .subquery()
    )
    runs = session.execute(
        select(Run, newest.c.step)
        .outerjoin(newest, newest.c.run_id == Run.id)
        .where(
            Run.project_id == project.id,
            or_(Run.weights_path.is_not(None), newest.c.step.is_not(None)),
        )
        .order_by(Run.created_at.desc())
    )
    ckpts = session.execute(
        select(Checkpoint, Run.id)
        .join(Run, Run.id == Checkpoint.run_id)
        .where(Run.project_id == project.id)
        .order_by(Checkpoint.created_at.desc())
    )
    return [
        ServedModel(
            r.id, r.weights_path or "", max(r.weights_step or 0, step or 0), r.id, r.created_at
        )
        for r, step in runs
    ] + [ServedModel(c.id, c.path, c.step, run_id, c.created_at) for c, run_id in ckpts]
