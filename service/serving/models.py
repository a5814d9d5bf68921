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
from functools import partial

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from service.checkpoints.service import merged_source
from service.config import Settings
from service.contract import storage
from service.contract.serving import (
    Unservable,
    checkpoint_gone,
    run_weights,
    unknown,
    wants_asking,
)
from service.contract.storage import CheckpointKind
from service.errors import Conflict, Gone, NotFound
from service.models import Checkpoint, Project, Run
from service.models.checkpoint import newest_checkpoint
from service.models.run import mark_serving_asked
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


def _refused(exc: Unservable) -> NotFound | Conflict | Gone:
    return {"not_found": NotFound, "conflict": Conflict, "gone": Gone}[exc.kind](exc.message)


def resolve(session: Session, settings: Settings, project: Project, name: str) -> ServedModel:
    try:
        if name.startswith("ckpt_"):
            return _checkpoint(session, settings, project, name)
        if name.startswith("run_"):
            return _run(session, settings, project, name)
        raise unknown(name)
    except Unservable as exc:
        raise _refused(exc) from None


def _checkpoint(session: Session, settings: Settings, project: Project, name: str) -> ServedModel:
    ckpt = session.get(Checkpoint, name)
    run = ckpt and session.get(Run, ckpt.run_id)
    if run is None or run.project_id != project.id:
        raise unknown(name)
    if not storage.exists(ckpt.path):
        raise checkpoint_gone(name, run.id)
    path = ckpt.path
    if ckpt.kind == CheckpointKind.LORA_ADAPTER:
        path = merged_source(session, settings, ckpt)
    folders = tuple(dict.fromkeys((ckpt.path, path)))
    return ServedModel(name, path, ckpt.step, run.id, ckpt.created_at, folders)


def _run(session: Session, settings: Settings, project: Project, name: str) -> ServedModel:
    """The run's newest weights (service.contract.serving.run_weights); a run publishes only
    once its model has been asked for (a finished run nobody served has its final
    checkpoint)."""
    run = session.get(Run, name)
    if run is None or run.project_id != project.id:
        raise unknown(name)
    publishing = partial(_publishing, run)
    if wants_asking(run.status, run.serving_asked_at is not None, publishing):
        mark_serving_asked(session, run.id)
        session.commit()
    ckpt = newest_checkpoint(session, run.id)
    weights = run_weights(
        name,
        run.status,
        publishing,
        run.weights_path,
        run.weights_step,
        ckpt and (ckpt.id, ckpt.step),
    )
    if weights.checkpoint is not None:
        served = _checkpoint(session, settings, project, weights.checkpoint)
        return ServedModel(name, served.path, weights.step, run.id, run.created_at)
    return ServedModel(name, weights.path, weights.step, run.id, run.created_at)


def _publishing(run: Run) -> bool:
    """Whether the run publishes weights at all (its spec is read only when this matters)."""
    return run_spec(run).serving.sync_every_steps > 0


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
