"""Run rules: creation (with idempotency), listing, the state machine, and the event log."""

import hashlib
import json
from functools import lru_cache
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Row, Select, Text, bindparam, cast, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gvpo_client.signing import new_secret
from service.config import Settings
from service.contract.events import EventType
from service.contract.files import FilePurpose, numbered_rows
from service.contract.graders import called_urls
from service.contract.groups import fit_problem
from service.contract.outbound import unreachable, webhook_url_problem
from service.contract.rewards import CompositeReward, RewardSpec, WebhookReward, reads_answer
from service.contract.spec import RunSpec
from service.contract.states import NotifyState
from service.contract.tracking import TrackingSpec
from service.db import Steps, after_commit, run_steps
from service.errors import Conflict, InvalidSpec, NotFound, invalid_spec
from service.files.service import get_file
from service.graders.judges import check_judges
from service.models import Project, Run, RunEvent
from service.models.run_event import add_event
from service.runs.admission import admit
from service.runs.preflight import check_model
from service.runs.sources import resolve_model


def check_dataset(session: Session, project: Project, spec: RunSpec) -> None:
    """The training (and eval) file: the project's own, with the prompt and answer fields in
    every row, or chat rows."""
    ds = spec.dataset
    bad = []
    for kind in ("train_file", "eval_file"):
        if (file_id := getattr(ds, kind)) is None:
            continue
        try:
            file = get_file(session, project, file_id)
        except NotFound as exc:
            bad.append({"field": f"dataset.{kind}", "message": exc.message})
            continue
        # Chat rows hold their prompt in `messages`; their answer is optional (an environment
        # or a reward webhook may score without one). Plain rows need an answer only for a
        # reward that reads it (a grader reads the fields its templates name).
        needed = []
        if "messages" not in file.fields:
            needed.append(("prompt_field", ds.prompt_field))
            if reads_answer(spec.reward):
                needed.append(("answer_field", ds.answer_field))
        bad += [
            {
                "field": f"dataset.{attr}",
                "message": f"file {file.id} has no field {name!r} in every row (fields "
                f"present in every row: {', '.join(file.fields) or 'none'}; or give chat "
                "rows with 'messages')",
            }
            for attr, name in needed
            if name not in file.fields
        ]
    bad += _offpolicy_problems(session, project, spec)
    if bad:
        raise InvalidSpec(bad)


def _offpolicy_problems(session: Session, project: Project, spec: RunSpec) -> list[dict]:
    """The off-policy file: the project's own, of purpose offpolicy, with groups of at most k
    completions (the learner trains groups of algorithm.group_size; smaller ones are topped
    up)."""
    if (file_id := spec.dataset.offpolicy_file) is None:
        return []
    field = "dataset.offpolicy_file"
    try:
        file = get_file(session, project, file_id)
    except NotFound as exc:
        return [{"field": field, "message": exc.message}]
    if file.purpose != FilePurpose.OFFPOLICY:
        return [
            {
                "field": field,
                "message": f"file {file.id} was uploaded with purpose "
                f"{file.purpose!r}; off-policy groups need purpose 'offpolicy'",
            }
        ]
    k, ranks = spec.algorithm.group_size, spec.resources.ranks
    for number, row in numbered_rows(file.path):
        if problem := fit_problem(row, k, ranks):
            return [{"field": field, "message": f"line {number} of file {file.id} {problem}"}]
    return []


def check_webhooks(
    settings: Settings,
    reward: RewardSpec,
    notify_url: str | None = None,
    tracking: TrackingSpec | None = None,
) -> None:
    """The URLs a reward (and a run's notify_url and MLflow server) would call: each may be
    called, and a webhook with probe set answers. A tracking server is not probed: one that is
    down costs the run a warning, not the run."""
    hooks = [("reward", reward)] if isinstance(reward, WebhookReward) else []
    if isinstance(reward, CompositeReward):
        hooks = [
            (f"reward.components.{i}", c)
            for i, c in enumerate(reward.components)
            if isinstance(c, WebhookReward)
        ]
    urls = [(f"{where}.url", hook.url) for where, hook in hooks] + called_urls(reward, "reward")
    if notify_url is not None:
        urls.append(("notify_url", notify_url))
    if tracking is not None and tracking.mlflow is not None:
        urls.append(("tracking.mlflow.uri", tracking.mlflow.uri))
    bad = [
        {"field": field, "message": problem}
        for field, url in urls
        if (problem := webhook_url_problem(url, settings.webhook_allow_private))
    ]
    if not bad:  # only URLs that may be called are probed
        bad = [
            {"field": f"{where}.url", "message": problem}
            for where, hook in hooks
            if hook.probe and (problem := unreachable(hook.url, settings.webhook_allow_private))
        ]
    if bad:
        raise InvalidSpec(bad)


def _stored_spec(spec: RunSpec) -> dict[str, Any]:
    """The spec as stored, every default filled in: the worker validates exactly this again, so
    it must pass here too (a default that breaks a rule is the submitter's to change)."""
    stored = spec.model_dump(mode="json")
    try:
        RunSpec.model_validate(stored)
    except ValidationError as exc:
        raise invalid_spec(exc.errors(), stored) from None
    return stored


def _request_hash(spec: RunSpec) -> str:
    return hashlib.sha256(json.dumps(spec.model_dump(), sort_keys=True).encode()).hexdigest()


def _replay(session: Session, project: Project, key: str, digest: str) -> Run | None:
    run = session.scalar(
        select(Run).where(Run.project_id == project.id, Run.idempotency_key == key)
    )
    if run is not None and run.request_hash != digest:
        raise Conflict(
            f"Idempotency-Key {key!r} was already used with a different request body",
            {"run_id": run.id},
        )
    return run


def create_run(
    session: Session,
    settings: Settings,
    project: Project,
    spec: RunSpec,
    idempotency_key: str | None,
) -> tuple[Run, str | None]:
    """Record a queued run and enqueue it after commit. Returns the run and its webhook secret
    in clear, shown this once (None: a replay, which returns the run made before)."""
    digest = _request_hash(spec)
    if idempotency_key and (existing := _replay(session, project, idempotency_key, digest)):
        return existing, None
    resolved = resolve_model(session, settings, project, spec)
    spec = resolved.public
    check_dataset(session, project, spec)
    check_model(settings, session, project, resolved.spec, resolved.shown)
    check_webhooks(settings, spec.reward, spec.notify_url, spec.tracking)
    check_judges(session, project, spec.reward)
    stored = _stored_spec(spec)
    secret = spec.webhook_secret.get_secret_value() if spec.webhook_secret else new_secret()
    run = Run(
        project_id=project.id,
        name=spec.name,
        spec=stored,
        model_source=resolved.source,
        webhook_secret_encrypted=settings.sealer.seal(secret),
        idempotency_key=idempotency_key,
        request_hash=digest,
        total_steps=spec.training.steps,
        notify_state=NotifyState.PENDING if spec.notify_url else None,
        queue=spec.resources.queue,
        priority=spec.resources.priority,
        devices=spec.resources.ranks,
    )
    session.add(run)
    try:
        session.flush()
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the race: answer with its run.
        # Nothing else was written in this transaction, so rolling it back loses nothing.
        session.rollback()
        if idempotency_key and (existing := _replay(session, project, idempotency_key, digest)):
            return existing, None
        raise
    add_event(
        session, run.id, EventType.RUN_QUEUED, f"run queued on queue {spec.resources.queue!r}"
    )
    after_commit(session, lambda: admit(settings, project.id))
    return run, secret


def run_spec(run: Run) -> RunSpec:
    """A run's stored spec, validated; one stored under older, looser rules is a conflict that
    says so, never an error of the server's."""
    try:
        return RunSpec.model_validate(run.spec)
    except ValidationError as exc:
        raise Conflict(
            f"run {run.id}'s stored spec no longer passes today's rules "
            f"({exc.error_count()} problems); submit a new run"
        ) from None


def get_run(session: Session, project: Project, run_id: str) -> Run:
    run = session.get(Run, run_id)
    if run is None or run.project_id != project.id:
        raise NotFound(f"no run {run_id!r} in this project")
    return run


_OWNER = select(Run.project_id).where(Run.id == bindparam("run"))


def check_run(session: Session, project: Project, run_id: str) -> None:
    """get_run's check without loading the run (its spec and all), for reads of its records:
    a chart's read would spend a sixth of its time on it."""
    if session.connection().scalar(_OWNER, {"run": run_id}) != project.id:
        raise NotFound(f"no run {run_id!r} in this project")


# What a listing shows of a run (RunRead's fields; gRPC's Run message): not its model source,
# secrets, lease or outbox. The table's columns: a page is read as plain rows, no ORM objects.
LISTED = tuple(
    Run.__table__.c[name]
    for name in (
        "id",
        "name",
        "status",
        "step",
        "total_steps",
        "cancel_requested",
        "tokens_generated",
        "samples_generated",
        "reward",
        "error",
        "waiting_reason",
        "created_at",
        "started_at",
        "finished_at",
        "spec",
    )
)


def list_runs(
    session: Session,
    project: Project,
    status: str | None,
    limit: int,
    after: str | None,
    spec_as_text: bool = False,
) -> tuple[list[Row], bool]:
    """Newest first; ids are time-ordered, so `after` (a run id) is a stable cursor. Rows of
    the LISTED columns, not ORM objects: a page is read often, and never changed. With
    `spec_as_text`, each spec is the JSON text stored, not parsed: a listing that answers in
    JSON passes it through (parsing and writing 20 specs again was half a listing's cost)."""
    return run_steps(session, page_steps(project, status, limit, after, spec_as_text))


def page_steps(
    project: Project,
    status: str | None,
    limit: int,
    after: str | None,
    spec_as_text: bool = False,
) -> Steps[tuple[list, bool]]:
    """list_runs, as the statement it runs (service.db's Steps: also on the API's event loop)."""
    params = {"project_id": project.id, "status": status, "after": after, "limit": limit + 1}
    rows = yield _page(bool(status), bool(after), spec_as_text), params
    return rows[:limit], len(rows) > limit


@lru_cache(maxsize=8)
def _page(status: bool, after: bool, spec_as_text: bool) -> Select:
    """The statement of a page of runs (with a status, after a cursor), built once."""
    runs = Run.__table__.c
    columns = [
        cast(c, Text).label(c.name) if spec_as_text and c is runs.spec else c for c in LISTED
    ]
    stmt = select(*columns).where(runs.project_id == bindparam("project_id"))
    if status:
        stmt = stmt.where(runs.status == bindparam("status"))
    if after:
        stmt = stmt.where(runs.id < bindparam("after"))
    return stmt.order_by(runs.id.desc()).limit(bindparam("limit"))


def list_events(
    session: Session,
    project: Project,
    run_id: str,
    after: int | None,
    limit: int,
) -> tuple[list[RunEvent], bool]:
    get_run(session, project, run_id)
    stmt = select(RunEvent).where(RunEvent.run_id == run_id)
    if after is not None:
        stmt = stmt.where(RunEvent.id > after)
    rows = list(session.scalars(stmt.order_by(RunEvent.id).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
