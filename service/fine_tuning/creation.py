"""Making a fine-tuning job: its body checked (the method, its files, its model), mapped to a
run spec (service/fine_tuning/mapping.py) and its run created by the runs service, with the
same checks as any run, their problems named by the job's fields."""

import secrets

from pydantic import ValidationError
from sqlalchemy.orm import Session

from gvpo_client.paths import LOCAL_PREFIXES
from service.config import Settings
from service.contract.files import FilePurpose
from service.contract.limits import INT32_MAX
from service.contract.spec import RunSpec
from service.errors import InvalidSpec, NotFound, invalid_spec
from service.files.service import get_file
from service.fine_tuning import mapping
from service.fine_tuning.schemas import JobCreate, JobRead
from service.fine_tuning.service import job_read
from service.models import File, FineTuningJob, Project, RegisteredModel
from service.models.base import new_id
from service.runs.preflight import completion_room
from service.runs.service import create_run
from service.runs.sources import resolve_model

RL_ONLY = (
    "this service trains with reinforcement fine-tuning (GVPO) only: give method "
    '{"type": "reinforcement", "reinforcement": {"grader": ..., "hyperparameters": ...}}'
)
FILE_FIELDS = {"train_file": "training_file", "eval_file": "validation_file"}


def _problem(field: str, message: str) -> dict[str, str]:
    return {"field": field, "message": message}


def _method_problems(body: JobCreate) -> list[dict[str, str]]:
    """What keeps the job from being a reinforcement job this service can train."""
    problems = []
    if body.method is None:
        problems.append(
            _problem("hyperparameters", f"without method, a job is supervised; {RL_ONLY}")
            if body.hyperparameters is not None
            else _problem("method", f"required: without it a job is supervised; {RL_ONLY}")
        )
    elif body.method.type != "reinforcement":
        problems.append(_problem("method.type", f"{body.method.type!r} is not offered; {RL_ONLY}"))
    elif body.method.reinforcement is None:
        problems.append(
            _problem("method.reinforcement", "required with type reinforcement: its grader")
        )
    elif body.hyperparameters is not None:
        problems.append(
            _problem(
                "hyperparameters",
                "deprecated: give them as method.reinforcement.hyperparameters",
            )
        )
    if body.integrations:
        problems.append(
            _problem(
                "integrations",
                "no integration is offered (this service sends no metrics to Weights & "
                "Biases); leave it out: the run's metrics are at GET /v1/runs/{run_id}/metrics",
            )
        )
    return problems


def _job_file(session: Session, project: Project, file_id: str, field: str) -> File:
    """The project's file of purpose fine-tune; 404 for a file it does not have."""
    try:
        file = get_file(session, project, file_id)
    except NotFound:
        raise NotFound(f"{field}: no file {file_id!r} in this project", {"field": field}) from None
    if file.purpose != FilePurpose.FINE_TUNE:
        raise InvalidSpec(
            [
                _problem(
                    field,
                    f"file {file.id} was uploaded with purpose {file.purpose!r}; a "
                    "fine-tuning job's files have purpose 'fine-tune'",
                )
            ]
        )
    return file


def _model_problem(session: Session, model: str) -> dict[str, str] | None:
    """A bare name, which is how OpenAI names its models, must be a registered base model (a run
    spec would take it for a hub id, which the worker then fails to find); the other forms are
    the run spec's to judge."""
    if model.startswith(("ckpt_", *LOCAL_PREFIXES)) or "/" in model:
        return None
    if session.get(RegisteredModel, model) is not None:
        return None
    return _problem(
        "model",
        f"no base model {model!r} is registered with this service: name one that is (an "
        "operator adds them with `gvpo models add NAME PATH`), a model folder under its "
        "model roots, a hub id (org/name) or a checkpoint of this project (ckpt_…)",
    )


def _validated(spec: dict) -> RunSpec:
    try:
        return RunSpec.model_validate(spec)
    except ValidationError as exc:
        error = invalid_spec(exc.errors(), spec, RunSpec)
        raise InvalidSpec(mapping.in_job_words(error.details["fields"])) from None


def _run_spec(session: Session, settings: Settings, project: Project, planned: dict) -> RunSpec:
    """The planned spec, its completion budget capped by the room the longest prompt leaves
    within the model's context (where the API can tell)."""
    spec = _validated(planned)
    try:
        resolved = resolve_model(session, settings, project, spec)
        room = completion_room(settings, session, project, resolved.spec, resolved.shown)
    except InvalidSpec as exc:
        raise InvalidSpec(mapping.in_job_words(exc.details["fields"])) from None
    if not room:
        return spec
    if tight := [
        _problem(
            FILE_FIELDS[attr],
            "its longest prompt leaves no room for a completion within the model's "
            "context (the chat template's own tokens reckoned in): shorten the prompts",
        )
        for attr, left in room.items()
        if left < 1
    ]:
        raise InvalidSpec(tight)
    budget = min(spec.sampling.max_new_tokens, *room.values())
    return _validated({**planned, "sampling": {"max_new_tokens": budget}})


def create_job(session: Session, settings: Settings, project: Project, body: JobCreate) -> JobRead:
    """Check the body, make the job's run (queued, enqueued after commit) and record the job."""
    if problems := _method_problems(body):
        raise InvalidSpec(problems)
    train = _job_file(session, project, body.training_file, "training_file")
    if body.validation_file is not None:
        _job_file(session, project, body.validation_file, "validation_file")
    job_id = new_id("ftjob", sep="-")
    seed = body.seed if body.seed is not None else secrets.randbelow(INT32_MAX + 1)
    planned, problems = mapping.plan(body, job_id, seed, train.rows)
    if problem := _model_problem(session, body.model):
        problems.insert(0, problem)
    if problems:
        raise InvalidSpec(problems)
    spec = _run_spec(session, settings, project, planned.spec)
    try:
        run, _ = create_run(session, settings, project, spec, None)
    except InvalidSpec as exc:
        raise InvalidSpec(mapping.in_job_words(exc.details["fields"])) from None
    job = FineTuningJob(
        id=job_id,
        project_id=project.id,
        run_id=run.id,
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        suffix=body.suffix,
        seed=seed,
        job_metadata=body.metadata,
        method=body.method.model_dump(mode="json", exclude_unset=True),
        hyperparameters=planned.hyperparameters,
        created_at=run.created_at,
    )
    session.add(job)
    session.flush()
    return job_read(job, run, None)
