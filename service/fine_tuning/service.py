"""Fine-tuning jobs (OpenAI's API) as their GVPO runs stand: a job, its events and its
checkpoints read in OpenAI's shapes, and its run's cancel, pause and resume
(service/fine_tuning/creation.py makes jobs). A job is its project's own: another project's is a
404."""

import itertools
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.config import Settings
from service.contract.events import EventLevel
from service.contract.metrics import EVAL_REWARD_MEAN, LOSS, REWARD_MEAN
from service.contract.states import TERMINAL, RunStatus
from service.errors import NotFound
from service.fine_tuning.schemas import (
    CheckpointMetrics,
    JobCheckpoint,
    JobCheckpointList,
    JobError,
    JobEvent,
    JobEventList,
    JobList,
    JobRead,
    JobStatus,
    LegacyHyperparameters,
)
from service.models import Checkpoint, FineTuningJob, Metric, Project, Run, RunEvent
from service.models.base import utcnow
from service.runs import control

EVENT_PREFIX = "ftevent-"
LEVELS = {EventLevel.INFO: "info", EventLevel.WARNING: "warn", EventLevel.ERROR: "error"}


@dataclass(frozen=True)
class _Row:
    job: FineTuningJob
    run: Run


def get_job(session: Session, project: Project, job_id: str) -> FineTuningJob:
    job = session.get(FineTuningJob, job_id)
    if job is None or job.project_id != project.id:
        raise NotFound(f"no fine-tuning job {job_id!r} in this project")
    return job


def _final_checkpoints(session: Session, runs: list[Run]) -> dict[str, str]:
    """run id -> the checkpoint of its last step, for the succeeded ones (one query)."""
    ids = [r.id for r in runs if r.status == RunStatus.SUCCEEDED]
    if not ids:
        return {}
    rows = session.execute(
        select(Checkpoint.run_id, Checkpoint.id)
        .join(Run, Run.id == Checkpoint.run_id)
        .where(Checkpoint.run_id.in_(ids), Checkpoint.step == Run.total_steps)
    )
    return {run_id: ckpt_id for run_id, ckpt_id in rows}


def job_status(run: Run) -> JobStatus:
    if run.status == RunStatus.RUNNING and run.pause_requested and not run.cancel_requested:
        return JobStatus.PAUSING
    return JobStatus(run.status)


def _seconds(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def _estimated_finish(run: Run) -> int | None:
    """A running run's start plus its time so far, scaled by the steps it has left."""
    if run.status != RunStatus.RUNNING or not run.step or run.started_at is None:
        return None
    spent = (utcnow() - run.started_at).total_seconds()
    return int(run.started_at.timestamp() + spent * run.total_steps / run.step)


def _error(run: Run) -> JobError | None:
    if run.status != RunStatus.FAILED:
        return None
    return JobError(code="run_failed", message=run.error or "the run failed", param=None)


def job_read(job: FineTuningJob, run: Run, final_checkpoint: str | None) -> JobRead:
    hp = job.hyperparameters
    method = dict(job.method)
    method["reinforcement"] = {**method.get("reinforcement", {}), "hyperparameters": hp}
    return JobRead(
        id=job.id,
        created_at=_seconds(job.created_at),
        error=_error(run),
        fine_tuned_model=final_checkpoint,
        finished_at=_seconds(run.finished_at),
        hyperparameters=LegacyHyperparameters(
            batch_size=hp["batch_size"],
            learning_rate_multiplier=hp["learning_rate_multiplier"],
            n_epochs=hp["n_epochs"],
        ),
        model=job.model,
        organization_id=job.project_id,
        result_files=[],
        seed=job.seed,
        status=job_status(run),
        trained_tokens=run.tokens_generated if run.status in TERMINAL else None,
        training_file=job.training_file,
        validation_file=job.validation_file,
        estimated_finish=_estimated_finish(run),
        integrations=[],
        metadata=job.job_metadata,
        method=method,
        run_id=run.id,
    )


def read_job(session: Session, project: Project, job_id: str) -> JobRead:
    job = get_job(session, project, job_id)
    run = session.get(Run, job.run_id)
    return job_read(job, run, _final_checkpoints(session, [run]).get(run.id))


def _matches(job: FineTuningJob, metadata: dict[str, str] | None) -> bool:
    """OpenAI's metadata filter: every pair given ({} matches all; None: jobs without any)."""
    if metadata is None:
        return not job.job_metadata
    return all((job.job_metadata or {}).get(k) == v for k, v in metadata.items())


def list_jobs(
    session: Session,
    project: Project,
    after: str | None,
    limit: int,
    metadata: dict[str, str] | None,
) -> JobList:
    """Newest first; `after` (a job id: ids are time-ordered) is the cursor. A metadata filter
    is applied to the project's jobs in order until the page is full."""
    stmt = (
        select(FineTuningJob, Run)
        .join(Run, Run.id == FineTuningJob.run_id)
        .where(FineTuningJob.project_id == project.id)
        .order_by(FineTuningJob.id.desc())
    )
    if after:
        stmt = stmt.where(FineTuningJob.id < after)
    if metadata == {}:
        rows = [_Row(*r) for r in session.execute(stmt.limit(limit + 1))]
    else:
        result = session.execute(stmt.execution_options(yield_per=100))
        try:
            found = (_Row(*r) for r in result)
            rows = list(
                itertools.islice((r for r in found if _matches(r.job, metadata)), limit + 1)
            )
        finally:
            result.close()
    page = rows[:limit]
    final = _final_checkpoints(session, [r.run for r in page])
    return JobList(
        data=[job_read(r.job, r.run, final.get(r.run.id)) for r in page], has_more=len(rows) > limit
    )


def event_cursor(after: str | None) -> int | None:
    """An event id (ftevent-<n>) as the run event's id."""
    return None if after is None else int(after.removeprefix(EVENT_PREFIX))


def list_events(
    session: Session, project: Project, job_id: str, after: str | None, limit: int
) -> JobEventList:
    """The run's events, newest first (OpenAI's order); `after` an event id of the page before."""
    job = get_job(session, project, job_id)
    stmt = select(RunEvent).where(RunEvent.run_id == job.run_id)
    if (cursor := event_cursor(after)) is not None:
        stmt = stmt.where(RunEvent.id < cursor)
    rows = list(session.scalars(stmt.order_by(RunEvent.id.desc()).limit(limit + 1)))
    events = [
        JobEvent(
            id=f"{EVENT_PREFIX}{e.id}",
            created_at=_seconds(e.created_at),
            level=LEVELS.get(e.level, "info"),
            message=e.message,
            data={**(e.data or {}), "gvpo_type": e.type},
        )
        for e in rows[:limit]
    ]
    return JobEventList(data=events, has_more=len(rows) > limit)


CHECKPOINT_METRICS = {LOSS: "train_loss", REWARD_MEAN: "train_reward_mean"}
CHECKPOINT_METRICS[EVAL_REWARD_MEAN] = "valid_reward_mean"


def list_checkpoints(
    session: Session, project: Project, job_id: str, after: str | None, limit: int
) -> JobCheckpointList:
    """The run's checkpoints (those checkpoint.keep_last kept), newest first; `after` a
    checkpoint id of the page before."""
    job = get_job(session, project, job_id)
    stmt = select(Checkpoint).where(Checkpoint.run_id == job.run_id)
    if after is not None:
        cursor = session.get(Checkpoint, after)
        if cursor is None or cursor.run_id != job.run_id:
            raise NotFound(f"after: no checkpoint {after!r} in job {job.id}")
        stmt = stmt.where(Checkpoint.step < cursor.step)
    rows = list(session.scalars(stmt.order_by(Checkpoint.step.desc()).limit(limit + 1)))
    page = rows[:limit]
    values: dict[int, dict[str, float]] = {c.step: {} for c in page}
    for step, name, value in session.execute(
        select(Metric.step, Metric.name, Metric.value).where(
            Metric.run_id == job.run_id,
            Metric.step.in_(list(values)),
            Metric.name.in_(list(CHECKPOINT_METRICS)),
        )
    ):
        values[step][CHECKPOINT_METRICS[name]] = value
    data = [
        JobCheckpoint(
            id=c.id,
            created_at=_seconds(c.created_at),
            fine_tuned_model_checkpoint=c.id,
            fine_tuning_job_id=job.id,
            metrics=CheckpointMetrics(step=c.step, **values[c.step]),
            step_number=c.step,
        )
        for c in page
    ]
    return JobCheckpointList(
        data=data,
        has_more=len(rows) > limit,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


# ---------------------------------------------------------------- control


def cancel_job(session: Session, project: Project, job_id: str) -> JobRead:
    control.cancel_run(session, project, get_job(session, project, job_id).run_id)
    return read_job(session, project, job_id)


def pause_job(session: Session, project: Project, job_id: str) -> JobRead:
    control.pause_run(session, project, get_job(session, project, job_id).run_id)
    return read_job(session, project, job_id)


def resume_job(session: Session, settings: Settings, project: Project, job_id: str) -> JobRead:
    control.resume_run(session, settings, project, get_job(session, project, job_id).run_id)
    return read_job(session, project, job_id)
