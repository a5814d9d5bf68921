"""One sample graded for POST /v1/graders:run (GRADE_TASK): the grader built as a run builds it
(workers/graders/registry.py), the sample and item as given, the grade in OpenAI's terms. A
failure that would fail a run (a judge that cannot be reached, no sandbox here) is this
answer's error instead: model_grader_server_error for a judge, python_grader_server_error
for code."""

import time

from service.config import Settings
from service.contract.tasks import GradeOutput, GradeTask, TaskAnswer
from workers.errors import RunError
from workers.graders.base import Grade, GradeError, GradingContext, Sample
from workers.graders.registry import build_grader
from workers.graders.served import JudgeFailed

RUNS_CODE = ("python", "code_tests")


def answer_grade(settings: Settings, task: GradeTask) -> TaskAnswer:
    spec = task.grader
    started = time.perf_counter()
    try:
        grader = build_grader(spec, GradingContext(settings, task.project_id))
        grade = grader.grade([(Sample.of(task.model_sample), task.item)])[0]
    except JudgeFailed as exc:
        grade = Grade.failed(GradeError.MODEL_SERVER, str(exc))
    except RunError as exc:
        grade = Grade.failed(_server_error(spec), str(exc))
    return TaskAnswer(
        result=GradeOutput(
            reward=grade.reward,
            error=grade.error,
            detail=grade.detail,
            sub_rewards=grade.sub_rewards,
            token_usage=grade.token_usage,
            model=grade.model,
            usage=grade.usage or _usage(grade),
            execution_time=time.perf_counter() - started,
        ).model_dump(mode="json")
    )


def _server_error(spec) -> GradeError:
    kinds = {spec.type, *(g.type for g in getattr(spec, "graders", {}).values())}
    return GradeError.PYTHON_SERVER if kinds & set(RUNS_CODE) else GradeError.OTHER


def _usage(grade: Grade) -> dict[str, dict[str, int]]:
    """Per model, for a grade that carries only a total (a grader that does not split it)."""
    if grade.model is None or not grade.token_usage:
        return {}
    return {grade.model: {"total_tokens": grade.token_usage}}
