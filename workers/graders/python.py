"""The `python` grader: the user's `grade(sample, item) -> float`, run in the grading sandbox
(workers/graders/sandboxed.py; the harness is workers/graders/harness/python_grader.py).

One sandbox grades a whole batch (several, in parallel, for a large one): it loads the source
once and calls `grade` for one pair after another, each within `timeout_s`. `sample` is a
dict whose keys are also attributes (output_text, output_json, output_tools), `item` the row's
dict. A grading that raises, returns something other than a finite number, or runs past its
time is that sample's reward 0 with PYTHON_RUNTIME (UNRESPONSIVE for the time) and the
traceback's end; one that kills its sandbox (os._exit, a crash, a limit) is found out by
grading it again alone, and only it gets 0.
"""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.contract.graders import PythonGrader
from workers.graders.base import Grade, GradeError, GradingContext, Sample, register
from workers.graders.sandboxed import (
    GRACE_S,
    Died,
    SandboxDied,
    SandboxLimits,
    SandboxSession,
    harness,
    hidden_paths,
    run_items,
    run_parallel,
)
from workers.sandbox import check_sandbox

PROCESSES = 32  # processes and threads in one sandbox at once
FILE_SIZE_MB = 16  # largest file the code may write (its scratch /tmp holds 4 of them)
ERRORS = {"runtime": GradeError.PYTHON_RUNTIME, "timeout": GradeError.UNRESPONSIVE}


class _LoadFailed(Exception):
    def __init__(self, grade: Grade) -> None:
        super().__init__(grade.detail)
        self.grade = grade


class PythonSandboxGrader:
    def __init__(
        self,
        spec: PythonGrader,
        hide: Sequence[str | Path] = (),
        python: str | None = None,
        workers: int | None = None,
    ) -> None:
        """`hide`: paths the code must not see besides the sandbox's defaults; `python`: the
        sandbox's interpreter (default: the worker's, without its virtual environment);
        `workers`: sandboxes at once (default: the CPU count). Raises SandboxUnavailable (a
        RunError) when no sandbox starts here."""
        check_sandbox(python)
        self.spec, self.hide, self.python, self.workers = spec, tuple(hide), python, workers
        self.code = harness("python_grader")

    def grade(self, pairs: list[tuple[Sample, dict[str, Any]]]) -> list[Grade]:
        requests = [{"sample": s.namespace(), "item": item} for s, item in pairs]
        return run_parallel(requests, self._grade_chunk, self.workers)

    def _grade_chunk(self, requests: Sequence[dict[str, Any]]) -> list[Grade]:
        timeout_s = self.spec.timeout_s
        limits = SandboxLimits(
            timeout_s=timeout_s,
            # all the chunk's gradings, each to its time limit, and the loading
            cpu_s=math.ceil((len(requests) + 1) * timeout_s) + 10,
            memory_mb=self.spec.memory_mb,
            processes=PROCESSES,
            file_size_mb=FILE_SIZE_MB,
        )

        def open_session() -> SandboxSession:
            session = SandboxSession(self.code, limits, hide=self.hide, python=self.python)
            load = {
                "source": self.spec.source,
                "timeout_s": timeout_s,
                "memory_mb": self.spec.memory_mb,
            }
            try:
                said = session.ask(load, timeout_s + GRACE_S)
            except SandboxDied as exc:
                session.close()
                detail = f"the grading sandbox ended while loading the source: {exc.reason}"
                raise _LoadFailed(Grade.failed(GradeError.PYTHON_RUNTIME, detail)) from None
            if said.get("ready") is not True:
                session.close()
                raise _LoadFailed(_grade_of(said))
            return session

        try:
            answers = run_items(requests, open_session, lambda s, r: s.ask(r, timeout_s + GRACE_S))
        except _LoadFailed as failed:
            return [failed.grade for _ in requests]
        return [_grade_of(answer) for answer in answers]


def _grade_of(answer: dict[str, Any] | Died) -> Grade:
    if isinstance(answer, Died):
        detail = f"the grading sandbox ended during this grading: {answer.reason}"
        return Grade.failed(GradeError.PYTHON_RUNTIME, detail)
    reward = answer.get("reward")
    if isinstance(reward, int | float) and not isinstance(reward, bool) and math.isfinite(reward):
        return Grade(float(reward))
    kind = ERRORS.get(answer.get("error"), GradeError.PYTHON_RUNTIME)
    return Grade.failed(kind, str(answer.get("detail") or answer)[-2_000:])


@register("python")
def build(spec: PythonGrader, context: GradingContext) -> PythonSandboxGrader:
    return PythonSandboxGrader(spec, hide=hidden_paths(context.settings))
