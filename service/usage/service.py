"""Usage figures (what the workers recorded per attempt of a run and per day), the project's
quota and how much of it is used, and a spec's cost estimate."""

from datetime import date

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.config import Settings
from service.contract.spec import RunSpec
from service.contract.states import RunStatus
from service.errors import BadRequest, NotFound
from service.graders.judges import check_judges
from service.models import InferenceUsage, Project, Run, Usage
from service.runs.admission import hours_used, quota_of
from service.runs.preflight import check_model
from service.runs.service import check_dataset, get_run
from service.runs.sources import resolve_model
from service.usage.schemas import (
    Estimate,
    QuotaRead,
    RunUsage,
    UsageFigures,
    UsageReport,
    UsageRow,
)

COUNTS = ("tokens_generated", "tokens_trained", "reward_calls", "environment_calls")
_SUMS = [func.sum(Usage.device_seconds), *(func.sum(getattr(Usage, name)) for name in COUNTS)]


def _fold(rows) -> dict[object, UsageFigures]:
    """(key, device, device_seconds, *COUNTS) rows -> figures per key, devices apart."""
    folded: dict[object, UsageFigures] = {}
    for key, device, seconds, *counts in rows:
        figures = folded.setdefault(key, UsageFigures())
        if device == "gpu":
            figures.gpu_seconds += float(seconds or 0)
        else:
            figures.cpu_seconds += float(seconds or 0)
        for name, value in zip(COUNTS, counts, strict=True):  # PostgreSQL's sums are numeric
            setattr(figures, name, getattr(figures, name) + int(value or 0))
    return folded


def _add_inference(folded: dict[object, UsageFigures], rows) -> None:
    """(key, requests, prompt_tokens, completion_tokens) rows added to the figures per key."""
    for key, requests, prompt, completion in rows:
        figures = folded.setdefault(key, UsageFigures())
        figures.inference_requests += int(requests or 0)
        figures.inference_prompt_tokens += int(prompt or 0)
        figures.inference_completion_tokens += int(completion or 0)


_SERVED = [
    func.sum(InferenceUsage.requests),
    func.sum(InferenceUsage.prompt_tokens),
    func.sum(InferenceUsage.completion_tokens),
]


def _total(parts) -> UsageFigures:
    total = UsageFigures()
    for figures in parts:
        for name in UsageFigures.model_fields:
            setattr(total, name, getattr(total, name) + getattr(figures, name))
    return total


def quota_read(session: Session, settings: Settings, project: Project) -> QuotaRead:
    quota = quota_of(project, settings)
    return QuotaRead(
        max_concurrent_runs=quota.max_concurrent_runs,
        max_gpus=quota.max_gpus,
        gpu_hours=quota.gpu_hours,
        gpu_hours_used=hours_used(session, project.id),
    )


def usage_report(
    session: Session,
    settings: Settings,
    project: Project,
    group_by: str,
    since: date | None,
    until: date | None,
) -> UsageReport:
    """The project's usage per day or per run, from `since` to `until` (days, inclusive)."""

    def of(table, by: list, sums: list):
        """The project's rows of `table` in the days asked for, summed per key (and `by`)."""
        key = table.day if group_by == "day" else table.run_id
        stmt = select(key, *by, *sums).where(table.project_id == project.id)
        if since is not None:
            stmt = stmt.where(table.day >= since)
        if until is not None:
            stmt = stmt.where(table.day <= until)
        return session.execute(stmt.group_by(key, *by))

    folded = _fold(of(Usage, [Usage.device], _SUMS))
    _add_inference(folded, of(InferenceUsage, [], _SERVED))
    data = [
        UsageRow(**figures.model_dump(), **{group_by if group_by == "day" else "run_id": k})
        for k, figures in sorted(folded.items(), key=lambda item: str(item[0]))
    ]
    return UsageReport(
        group_by=group_by,
        data=data,
        total=_total(folded.values()),
        quota=quota_read(session, settings, project),
    )


def run_usage(session: Session, project: Project, run_id: str) -> RunUsage:
    run = get_run(session, project, run_id)
    stmt = select(Usage.day, Usage.device, *_SUMS).where(Usage.run_id == run.id)
    folded = _fold(session.execute(stmt.group_by(Usage.day, Usage.device)))
    served = select(InferenceUsage.day, *_SERVED).where(InferenceUsage.run_id == run.id)
    _add_inference(folded, session.execute(served.group_by(InferenceUsage.day)))
    return RunUsage(
        run_id=run.id,
        attempts=run.attempts,
        total=_total(folded.values()),
        by_day=[UsageRow(**f.model_dump(), day=day) for day, f in sorted(folded.items())],
    )


def estimate(session: Session, settings: Settings, project: Project, spec: RunSpec) -> Estimate:
    """Upper bounds of what `spec` would use, device time from the project's own ended runs of
    the same model (device-seconds per generated token, over all of them). The spec is checked
    as a submission's is (its model, files and judges the project's to use, its sequences
    within the model's context), but for its webhook URLs, which are not called."""
    resolved = resolve_model(session, settings, project, spec)
    spec = resolved.public
    check_dataset(session, project, spec)
    check_model(settings, session, project, resolved.spec, resolved.shown)
    check_judges(session, project, spec.reward)
    t = spec.training
    completions = t.steps * t.prompts_per_step * spec.algorithm.group_size
    tokens = completions * spec.sampling.max_new_tokens
    devices = spec.resources.ranks
    past = select(Run.id).where(
        Run.project_id == project.id,
        Run.status == RunStatus.SUCCEEDED,
        Run.spec["model"]["path"].as_string() == spec.model.path,
    )
    seconds, generated, runs = session.execute(
        select(
            func.sum(Usage.device_seconds),
            func.sum(Usage.tokens_generated),
            func.count(func.distinct(Usage.run_id)),
        ).where(Usage.run_id.in_(past))
    ).one()
    quota = quota_read(session, settings, project)
    seconds, generated = float(seconds or 0), int(generated or 0)
    if not generated:
        hours, basis = None, f"no succeeded run of model {spec.model.path!r} in this project yet"
    else:
        hours = seconds / generated * tokens / 3600
        basis = (
            f"{seconds / generated * 1000:.3f} device-ms per generated token over {runs} "
            "succeeded runs of this model in this project, times tokens_generated_max"
        )
    left = None if quota.gpu_hours is None else quota.gpu_hours - quota.gpu_hours_used
    return Estimate(
        steps=t.steps,
        completions=completions,
        tokens_generated_max=tokens,
        devices=devices,
        device_hours=hours,
        basis=basis,
        quota=quota,
        fits_budget=None if left is None or hours is None else hours <= left,
    )


QUOTA_FIELDS = ("max_concurrent_runs", "max_gpus", "gpu_hours")


def set_quota(session: Session, project_name: str, limits: dict[str, float | None]) -> Project:
    """Give the named project its own `limits` (QUOTA_FIELDS; None: back to the settings'
    default). The scheduler applies them on its next pass."""
    project = session.scalar(select(Project).where(Project.name == project_name))
    if project is None:
        raise NotFound(f"no project named {project_name!r}")
    for name, value in limits.items():
        if name not in QUOTA_FIELDS:
            raise BadRequest(f"{name!r} is not a quota (one of {', '.join(QUOTA_FIELDS)})")
        if value is not None and value < (0 if name == "gpu_hours" else 1):
            raise BadRequest(f"{name} must be at least {0 if name == 'gpu_hours' else 1}")
        setattr(project, name, value)
    return project


def quotas(session: Session, settings: Settings, project_name: str | None) -> list[dict]:
    """Each project's quota in force (own or default) and device-hours used, by name."""
    stmt = select(Project).order_by(Project.name)
    if project_name is not None:
        stmt = stmt.where(Project.name == project_name)
    projects = list(session.scalars(stmt))
    if project_name is not None and not projects:
        raise NotFound(f"no project named {project_name!r}")
    return [
        {
            "project": project.name,
            **quota_read(session, settings, project).model_dump(),
            "own": [name for name in QUOTA_FIELDS if getattr(project, name) is not None],
        }
        for project in projects
    ]
