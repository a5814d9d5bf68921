"""The `code_tests` grader: the completion's program against the row's tests, TACO/APPS style,
each test in a fresh process of the grading sandbox (the harness is
workers/graders/harness/code_tests.py, a fork server; one sandbox serves many samples).

The program is the rendered `code` template's last fenced code block (```python, ```py or
```), else all of it. The tests are the row's `tests_field`, an object or its JSON text:

- {"inputs": [...], "outputs": [...]}: each input (text, or a list of lines) is the program's
  stdin and its stdout must match the output, compared as APPS does: line by line with
  surrounding whitespace dropped, else token by token, numbers within 1e-5 relative;
- the same with "fn_name": each input is the list of arguments of that function (or of that
  method of `class Solution`), whose return value must equal the output (or the output's only
  element, as TACO wraps them);
- a list of assert statements (or text of them, one a line), each run after the program.

A test fails when the program answers wrong, crashes, exits non-zero, or runs past timeout_s
or memory_mb: reward 0 for that test, no error. The reward is the share of tests passed
(`fraction`) or 1 when all pass (`all`, which stops at the first failure). A row whose tests
are missing or malformed is that sample's error (INVALID_VARIABLE, OTHER), reward 0.

Expected outputs never enter the sandbox: it returns what the program did, and the worker
compares. Assert tests, though, run in the program's own process, so a program written against
this harness could defeat them; prefer inputs/outputs tests where the policy may game them.
"""

import json
import math
import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from service.contract.graders import CodeTestsGrader, template_environment
from workers.graders.base import Grade, GradeError, GradingContext, Sample, register
from workers.graders.sandboxed import (
    GRACE_S,
    Died,
    SandboxLimits,
    SandboxSession,
    harness,
    hidden_paths,
    run_items,
    run_parallel,
)
from workers.sandbox import check_sandbox

FENCED = re.compile(r"```(?:python3?|py)?[ \t]*\r?\n(.*?)```", re.DOTALL)
PROCESSES = 32  # processes and threads in one sandbox at once (the tests' own included)
FILE_SIZE_MB = 64  # largest file (a test's stdin is one)
SERVER_CPU_S = 3_600  # the fork server's own CPU time; each test sets its own, lower
REL_TOL, ABS_TOL = 1e-5, 1e-8  # numbers in stdout, as APPS compares them (numpy.allclose)


@dataclass(frozen=True)
class Test:
    mode: str  # "stdio" | "call" | "assert"
    input: Any  # stdin text | the call's arguments | the assert statements
    expected: Any = None  # stdout text | the return value (stdio, call)
    fn_name: str | None = None  # call: the function


class BadTests(ValueError):
    def __init__(self, error: GradeError, detail: str) -> None:
        super().__init__(detail)
        self.error, self.detail = error, detail


# -- the program and the tests -----------------------------------------------------------------


def program_of(text: str) -> str:
    """The last fenced code block of `text`, else `text`."""
    blocks = FENCED.findall(text)
    return blocks[-1] if blocks else text


def _text(value: Any) -> str:
    """A TACO input or output: text, or a list of lines."""
    if isinstance(value, list):
        return "\n".join(str(v) for v in value)
    return value if isinstance(value, str) else json.dumps(value)


def parse_tests(raw: Any, field: str) -> list[Test]:
    """The tests a row holds (see the module's docstring); BadTests says what is wrong."""
    if raw is None:
        raise BadTests(GradeError.INVALID_VARIABLE, f"the row has no {field!r} (the tests)")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            lines = [line for line in raw.splitlines() if line.strip()]
            if not lines or not all(line.lstrip().startswith("assert") for line in lines):
                raise BadTests(
                    GradeError.OTHER, f"{field} is text that is neither JSON nor asserts"
                ) from None
            raw = lines
    if isinstance(raw, list):
        if not raw or not all(isinstance(t, str) and t.strip() for t in raw):
            raise BadTests(GradeError.OTHER, f"{field}: a list of tests must be assert statements")
        return [Test("assert", t) for t in raw]
    if not isinstance(raw, dict):
        raise BadTests(GradeError.OTHER, f"{field} must be an object or a list, not {raw!r:.80}")
    inputs, outputs, fn_name = raw.get("inputs"), raw.get("outputs"), raw.get("fn_name")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or not inputs:
        raise BadTests(GradeError.OTHER, f"{field} needs lists `inputs` and `outputs`")
    if len(inputs) != len(outputs):
        raise BadTests(
            GradeError.OTHER,
            f"{field} has {len(inputs)} inputs but {len(outputs)} outputs",
        )
    if fn_name is None:
        return [Test("stdio", _text(i), _text(o)) for i, o in zip(inputs, outputs, strict=True)]
    if not isinstance(fn_name, str) or not fn_name.isidentifier():
        raise BadTests(GradeError.OTHER, f"{field}: fn_name must be a function's name")
    return [
        Test("call", i if isinstance(i, list) else [i], o, fn_name)
        for i, o in zip(inputs, outputs, strict=True)
    ]


def _render(template: str, sample: Sample, item: dict[str, Any]) -> str:
    env = template_environment()
    try:
        return env.from_string(template).render(item=item, sample=sample.namespace())
    except jinja2.UndefinedError as exc:
        raise BadTests(GradeError.INVALID_VARIABLE, f"the code template: {exc}") from None
    except jinja2.TemplateError as exc:
        raise BadTests(GradeError.OTHER, f"the code template: {exc}") from None


# -- comparing ---------------------------------------------------------------------------------


def _close(a: str, b: str) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=REL_TOL, abs_tol=ABS_TOL)


def same_stdout(got: str, expected: str) -> bool:
    """APPS's comparison: the lines with surrounding whitespace dropped, else the tokens, where
    numbers may differ within REL_TOL."""
    lines = [line.strip() for line in got.strip().splitlines()]
    if lines == [line.strip() for line in expected.strip().splitlines()]:
        return True
    tokens, wanted = got.split(), expected.split()
    return len(tokens) == len(wanted) and all(
        a == b or _close(a, b) for a, b in zip(tokens, wanted, strict=True)
    )


def same_return(result: str | None, expected: Any) -> bool:
    if result is None:
        return False
    try:
        got = json.loads(result)
    except ValueError:
        return False
    if got == expected:
        return True
    return isinstance(expected, list) and len(expected) == 1 and got == expected[0]


def _outcome(test: Test, answer: dict[str, Any], timeout_s: float, memory_mb: int) -> str | None:
    """None when the test passed, else why it failed (one line)."""
    if answer.get("status") == "timeout":
        return f"ran past its time limit of {timeout_s:g} s"
    if answer.get("status") == "signal":
        number = answer.get("signal")
        name = signal.Signals(number).name if number in signal.valid_signals() else number
        return f"killed by {name} (limits: {memory_mb} MB, {timeout_s:g} s of CPU)"
    stderr = str(answer.get("stderr") or "").strip()
    if answer.get("code") != 0:
        last = stderr.splitlines()[-1] if stderr else ""
        return f"exited with status {answer.get('code')}" + (f": {last}" if last else "")
    if test.mode == "stdio":
        if answer.get("stdout_cut"):
            return "printed too much"
        if same_stdout(str(answer.get("stdout", "")), test.expected):
            return None
        return f"wrong output: {str(answer.get('stdout', ''))[:80]!r}"
    if test.mode == "call":
        if same_return(answer.get("result"), test.expected):
            return None
        return f"wrong return value: {str(answer.get('result'))[:80]}"
    return None if answer.get("result") == "passed" else "the asserts did not run through"


# -- grading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """One sample's tests, or why it has none to run."""

    program: str = ""
    tests: tuple[Test, ...] = ()
    bad: BadTests | None = None


class CodeTestsSandboxGrader:
    def __init__(
        self,
        spec: CodeTestsGrader,
        hide: Sequence[str | Path] = (),
        python: str | None = None,
        workers: int | None = None,
    ) -> None:
        """As PythonSandboxGrader's: `hide`, `python`, `workers` (sandboxes at once). Raises
        SandboxUnavailable (a RunError) when no sandbox starts here."""
        check_sandbox(python)
        self.spec, self.hide, self.python, self.workers = spec, tuple(hide), python, workers
        self.code = harness("code_tests")
        self.limits = SandboxLimits(
            timeout_s=spec.timeout_s,
            cpu_s=SERVER_CPU_S,
            memory_mb=spec.memory_mb,
            processes=PROCESSES,
            file_size_mb=FILE_SIZE_MB,
        )

    def _job(self, sample: Sample, item: dict[str, Any]) -> _Job:
        try:
            raw = item.get(self.spec.tests_field)
            tests = parse_tests(raw, self.spec.tests_field)[: self.spec.max_tests]
            program = program_of(_render(self.spec.code, sample, item))
        except BadTests as bad:
            return _Job(bad=bad)
        return _Job(program, tuple(tests))

    def grade(self, pairs: list[tuple[Sample, dict[str, Any]]]) -> list[Grade]:
        jobs = [self._job(sample, item) for sample, item in pairs]
        runnable = [j for j in jobs if j.bad is None]
        results = iter(run_parallel(runnable, self._run_chunk, self.workers, min_per_sandbox=1))
        grades = []
        for job in jobs:
            if job.bad is not None:
                grades.append(Grade.failed(job.bad.error, job.bad.detail))
            else:
                grades.append(next(results))
        return grades

    def _run_chunk(self, jobs: Sequence[_Job]) -> list[Grade]:
        def open_session() -> SandboxSession:
            return SandboxSession(self.code, self.limits, hide=self.hide, python=self.python)

        answers = run_items(jobs, open_session, self._run_job)
        return [
            _grade_of(answer, len(job.tests)) for job, answer in zip(jobs, answers, strict=True)
        ]

    def _run_job(self, session: SandboxSession, job: _Job) -> dict[str, Any]:
        """Run the sample's tests, one after another, in `session`."""
        spec, passed, failure = self.spec, 0, None
        for n, test in enumerate(job.tests, 1):
            request = {
                "program": job.program,
                "mode": test.mode,
                "input": test.input,
                "fn_name": test.fn_name,
                "timeout_s": spec.timeout_s,
                "memory_mb": spec.memory_mb,
            }
            answer = session.ask(request, spec.timeout_s + GRACE_S)
            why = _outcome(test, answer, spec.timeout_s, spec.memory_mb)
            if why is None:
                passed += 1
                continue
            failure = failure or f"test {n}: {why}"
            if spec.scoring == "all":
                break
        reward = passed / len(job.tests) if spec.scoring == "fraction" else float(failure is None)
        total = len(job.tests)
        detail = f"{passed} of {total} tests passed" + (f"; {failure}" if failure else "")
        return {"reward": reward, "detail": detail}


def _grade_of(answer: dict[str, Any] | Died, total: int) -> Grade:
    if isinstance(answer, Died):  # the program took the sandbox down: its tests failed
        return Grade(0.0, detail=f"0 of {total} tests passed: the sandbox ended ({answer.reason})")
    return Grade(answer["reward"], detail=answer["detail"])


@register("code_tests")
def build(spec: CodeTestsGrader, context: GradingContext) -> CodeTestsSandboxGrader:
    return CodeTestsSandboxGrader(spec, hide=hidden_paths(context.settings))
