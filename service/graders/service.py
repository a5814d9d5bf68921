"""Grading one sample, or checking a grader, outside a run.

The API checks the grader (its schema, templates and formulas: the contract), that the URLs
it would call may be called (422, as a run's webhooks), and that every model of ours a
score_model grader names is one of the caller's (404 otherwise, as serving says). To run
it, it resolves those models as serving would (409 while a run has nothing to serve, 410
when the files are gone), then a worker grades (GRADE_TASK, workers/graders/
single.py) and the API waits for it, as for the loss dry run: 504 when no worker answers in
time (GVPO_WORKER_ANSWER_TIMEOUT_S, plus GVPO_SERVE_LOAD_TIMEOUT_S when a judge of ours may
have to load), 503 when the broker is down.
"""

from sqlalchemy.orm import Session

from service.config import Settings
from service.contract.graders import called_urls, served_judges
from service.contract.outbound import webhook_url_problem
from service.contract.tasks import DEFAULT_QUEUE, GRADE_TASK, GradeOutput, GradeTask
from service.dispatch import ask_worker
from service.errors import InvalidSpec
from service.graders.judges import check_judges
from service.graders.schemas import (
    GraderRunErrors,
    GraderRunMetadata,
    GraderRunRequest,
    GraderRunResponse,
    GraderValidateRequest,
    GraderValidateResponse,
)
from service.models import Project
from service.serving.models import resolve

DETAILS = {  # the error kinds whose text OpenAI's answer carries, and where
    "model_grader_server_error": "model_grader_server_error_details",
    "python_grader_runtime_error": "python_grader_runtime_error_details",
    "python_grader_server_error": "python_grader_server_error_type",
}


def check_urls(settings: Settings, grader) -> None:
    """InvalidSpec naming each URL the grader would call (a judge's base_url, an embeddings
    endpoint) that may not be called: checked as a run's webhooks are at submission."""
    bad = [
        {"field": field, "message": problem}
        for field, url in called_urls(grader, "grader")
        if (problem := webhook_url_problem(url, settings.webhook_allow_private))
    ]
    if bad:
        raise InvalidSpec(bad)


def validate(
    session: Session, settings: Settings, project: Project, req: GraderValidateRequest
) -> GraderValidateResponse:
    check_urls(settings, req.grader)
    check_judges(session, project, req.grader)
    return GraderValidateResponse(grader=req.grader.model_dump(mode="json", exclude_none=True))


def run(
    session: Session, settings: Settings, project: Project, req: GraderRunRequest
) -> GraderRunResponse:
    check_urls(settings, req.grader)
    judges = served_judges(req.grader)
    for name in judges:
        resolve(session, settings, project, name)  # 404, 409 or 410 as serving answers
    task = GradeTask(
        project_id=project.id, grader=req.grader, model_sample=req.model_sample, item=req.item
    )
    session.commit()  # hold no database connection while the worker grades
    # the worker may first have an inference worker load the judge
    loading = settings.serve_load_timeout_s if judges else 0.0
    out = GradeOutput.model_validate(
        ask_worker(settings, GRADE_TASK, task, DEFAULT_QUEUE, "the grader run", loading)
    )
    return answer(req, out)


def answer(req: GraderRunRequest, out: GradeOutput) -> GraderRunResponse:
    """The worker's grade in OpenAI's shape."""
    errors = GraderRunErrors()
    if out.error is not None:
        kind = out.error if out.error in GraderRunErrors.model_fields else "other_error"
        setattr(errors, kind, True)
        if kind in DETAILS:
            setattr(errors, DETAILS[kind], out.detail)
    grader = req.grader
    return GraderRunResponse(
        reward=out.reward,
        metadata=GraderRunMetadata(
            name=grader.name or grader.type,
            type=grader.type,
            errors=errors,
            execution_time=out.execution_time,
            scores=dict(out.sub_rewards),
            token_usage=out.token_usage if out.usage or out.token_usage else None,
            sampled_model_name=out.model,
            detail=out.detail,
        ),
        sub_rewards=dict(out.sub_rewards),
        model_grader_token_usage_per_model=out.usage,
    )
