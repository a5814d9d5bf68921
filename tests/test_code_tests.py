"""The `code_tests` grader (workers/graders/code_tests.py) on a small TACO-style set written
here: stdin/stdout problems, function-call problems (a function, and LeetCode's class
Solution), assert-style tests; with correct, wrong, crashing and timing-out solutions, scored
by the share of tests passed or all-or-nothing; and rows whose tests are missing or malformed.

Needs bubblewrap (`make services` installs it).
"""

import json
import shutil

import pytest

from service.contract.graders import CodeTestsGrader
from workers.graders.base import Grade, GradeError, Sample
from workers.graders.code_tests import (
    CodeTestsSandboxGrader,
    parse_tests,
    program_of,
    same_return,
    same_stdout,
)

TIMEOUT_S = 1.0

# -- the problems --------------------------------------------------------------------------

SUM = {  # stdin/stdout: print a + b
    "inputs": ["1 2\n", "10 20\n", "-5 5\n"],
    "outputs": ["3\n", "30\n", "0\n"],
}
SORT = {  # stdin/stdout, several lines: n, then n numbers; print them sorted, one a line
    "inputs": ["3\n3 1 2\n", ["2", "5 4"]],
    "outputs": ["1\n2\n3\n", ["4", "5"]],
}
ADD = {"fn_name": "add", "inputs": [[1, 2], [3, 4], [2, 2]], "outputs": [[3], [7], [4]]}
TWO_SUM = {
    "fn_name": "twoSum",
    "inputs": [[[2, 7, 11, 15], 9], [[3, 2, 4], 6]],
    "outputs": [[0, 1], [1, 2]],
}
ASSERTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(0, 0) == 0"]

SOLUTIONS = {
    "sum correct": "a, b = map(int, input().split())\nprint(a + b)\n",
    "sum reads all of stdin": "import sys\nprint(sum(map(int, sys.stdin.read().split())))\n",
    "sum wrong": "a, b = map(int, input().split())\nprint(a - b)\n",
    "sum positives only": "a, b = map(int, input().split())\nprint(abs(a) + abs(b))\n",
    "sum crashes": "a, b = map(int, input().split())\nprint(a + b)\nraise RuntimeError('boom')\n",
    "sum times out": "while True:\n    pass\n",
    "sum exits 0 early": (
        "import sys\na, b = map(int, input().split())\nprint(a + b)\nsys.exit(0)\n"
    ),
    "sort correct": "n = int(input())\nprint(*sorted(map(int, input().split())), sep='\\n')\n",
    "add correct": "def add(a, b):\n    return a + b\n",
    "add wrong": "def add(a, b):\n    return a * b\n",
    "add sleeps": "import time\n\ndef add(a, b):\n    time.sleep(10)\n    return a + b\n",
    "add always equal": (
        "class Anything:\n    def __eq__(self, other):\n        return True\n\n"
        "def add(a, b):\n    return Anything()\n"
    ),
    "add exits before the asserts": (
        "import os\n\ndef add(a, b):\n    return a + b\n\nos._exit(0)\n"
    ),
    "two sum class": (
        "class Solution:\n    def twoSum(self, nums, target):\n"
        "        seen = {}\n        for i, n in enumerate(nums):\n"
        "            if target - n in seen:\n                return [seen[target - n], i]\n"
        "            seen[n] = i\n"
    ),
}


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}```\nIt reads the input and prints.\n"


def spec(**fields) -> CodeTestsGrader:
    return CodeTestsGrader(type="code_tests", timeout_s=TIMEOUT_S, **fields)


@pytest.fixture(scope="module")
def grader() -> CodeTestsSandboxGrader:
    if shutil.which("bwrap") is None:
        pytest.fail("bubblewrap (bwrap) is not installed: run `make services`")
    return CodeTestsSandboxGrader(spec())


def grade(grader: CodeTestsSandboxGrader, solution: str, tests) -> Grade:
    (graded,) = grader.grade([(Sample.of(fenced(SOLUTIONS[solution])), {"tests": tests})])
    return graded


# -- stdin/stdout ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solution", "reward"),
    [
        ("sum correct", 1.0),
        ("sum reads all of stdin", 1.0),
        ("sum exits 0 early", 1.0),
        ("sum wrong", 0.0),
        ("sum positives only", pytest.approx(2 / 3)),
        ("sum crashes", 0.0),
        ("sum times out", 0.0),
    ],
)
def test_stdin_stdout_solutions_get_the_share_of_tests_they_pass(grader, solution, reward):
    graded = grade(grader, solution, SUM)
    assert graded.reward == reward and graded.error is None


def test_why_tests_failed_is_told(grader):
    assert "test 1: ran past its time limit of 1 s" in grade(grader, "sum times out", SUM).detail
    crashed = grade(grader, "sum crashes", SUM).detail
    assert "exited with status 1: RuntimeError: boom" in crashed
    assert grade(grader, "sum correct", SUM).detail == "3 of 3 tests passed"


def test_inputs_and_outputs_may_be_lists_of_lines(grader):
    assert grade(grader, "sort correct", SORT) == Grade(1.0, detail="2 of 2 tests passed")


def test_tests_may_be_json_text(grader):
    assert grade(grader, "sum correct", json.dumps(SUM)).reward == 1.0


def test_all_scoring_gives_one_only_when_every_test_passes():
    grader = CodeTestsSandboxGrader(spec(scoring="all"))
    pairs = [
        (Sample.of(fenced(SOLUTIONS[s])), {"tests": SUM})
        for s in ("sum correct", "sum positives only", "sum wrong")
    ]
    assert [g.reward for g in grader.grade(pairs)] == [1.0, 0.0, 0.0]


def test_max_tests_runs_only_the_first_tests():
    grader = CodeTestsSandboxGrader(spec(max_tests=2))
    (graded,) = grader.grade([(Sample.of(fenced(SOLUTIONS["sum positives only"])), {"tests": SUM})])
    assert graded == Grade(1.0, detail="2 of 2 tests passed")


# -- function calls and asserts ------------------------------------------------------------


@pytest.mark.parametrize(
    ("solution", "reward"),
    [
        ("add correct", 1.0),
        ("add wrong", pytest.approx(1 / 3)),  # only 2 * 2 == 2 + 2
        ("add sleeps", 0.0),
        ("add always equal", 0.0),  # compared as JSON, outside the program's process
    ],
)
def test_function_solutions_are_called_with_each_input(grader, solution, reward):
    graded = grade(grader, solution, ADD)
    assert graded.reward == reward and graded.error is None


def test_a_method_of_class_solution_is_called_leetcode_style(grader):
    assert grade(grader, "two sum class", TWO_SUM).reward == 1.0


@pytest.mark.parametrize(
    ("solution", "reward"),
    [
        ("add correct", 1.0),
        ("add wrong", pytest.approx(1 / 3)),  # only 0 * 0 == 0
        ("add exits before the asserts", 0.0),
    ],
)
def test_assert_tests_run_after_the_program(grader, solution, reward):
    graded = grade(grader, solution, ASSERTS)
    assert graded.reward == reward and graded.error is None


def test_assert_tests_may_be_text_one_a_line(grader):
    assert grade(grader, "add correct", "\n".join(ASSERTS)).reward == 1.0


# -- what a program cannot do to the grading -----------------------------------------------

# Writes, where the sandbox's server answers the worker, an answer that says it passed. (The
# server is not dumpable, so its /proc files are closed to the tests; under a root worker the
# pipes, the worker's, would refuse a reopening by `nobody` anyway.)
FORGE = """
import json, os
line = json.dumps({"status": "exit", "code": 0, "signal": None, "stdout": "3",
                   "stdout_cut": False, "stderr": "", "result": "passed", "elapsed_s": 0.0})
for fd in range(10):
    try:
        os.write(os.open(f"/proc/{os.getppid()}/fd/{fd}", os.O_WRONLY), line.encode() + b"\\n")
    except OSError:
        pass
"""


@pytest.mark.parametrize(
    "program",
    [
        "import os, signal\nos.kill(-1, signal.SIGKILL)\n",  # everything in its sandbox
        "bytearray(10 * 1024**3)\n",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "import os\nos.write(1, b'x' * (20 * 1024 * 1024))\n",
        FORGE,
    ],
    ids=["kills the sandbox", "10 GB", "fork bomb", "floods stdout", "forges an answer"],
)
def test_a_hostile_program_fails_and_the_samples_around_it_are_graded(grader, program):
    correct = (Sample.of(fenced(SOLUTIONS["sum correct"])), {"tests": SUM})
    before, hostile, after = grader.grade(
        [correct, (Sample.of(fenced(program)), {"tests": SUM}), correct]
    )
    assert before.reward == after.reward == 1.0
    assert hostile.reward == 0.0 and hostile.error is None


# -- rows without usable tests ------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "error", "needle"),
    [
        ({}, GradeError.INVALID_VARIABLE, "the row has no 'tests'"),
        ({"tests": "not json"}, GradeError.OTHER, "neither JSON nor asserts"),
        ({"tests": {"inputs": ["1"], "outputs": []}}, GradeError.OTHER, "1 inputs but 0"),
        ({"tests": {"inputs": []}}, GradeError.OTHER, "lists `inputs` and `outputs`"),
        ({"tests": [1, 2]}, GradeError.OTHER, "assert statements"),
        ({"tests": 7}, GradeError.OTHER, "an object or a list"),
        ({"tests": {**ADD, "fn_name": "no such"}}, GradeError.OTHER, "a function's name"),
    ],
)
def test_a_row_without_usable_tests_is_that_samples_error(grader, item, error, needle):
    correct = (Sample.of(fenced(SOLUTIONS["sum correct"])), {"tests": SUM})
    bad, good = grader.grade([(Sample.of("print(1)"), item), correct])
    assert (bad.reward, bad.error) == (0.0, error) and needle in bad.detail
    assert good.reward == 1.0


def test_a_code_template_naming_a_missing_field_is_that_samples_error():
    grader = CodeTestsSandboxGrader(spec(code="{{ item.prefix }}{{ sample.output_text }}"))
    (graded,) = grader.grade([(Sample.of("print(3)"), {"tests": SUM})])
    assert graded.error is GradeError.INVALID_VARIABLE and "prefix" in graded.detail


def test_the_code_template_can_join_row_fields_and_the_completion():
    grader = CodeTestsSandboxGrader(spec(code="{{ item.prelude }}\n{{ sample.output_text }}"))
    item = {"prelude": "def add(a, b):\n    return a + b", "tests": ["assert add(2, 2) == 4"]}
    (graded,) = grader.grade([(Sample.of("x = 1"), item)])
    assert graded.reward == 1.0


def test_the_code_tests_kind_is_registered_and_built_from_the_runs_settings(tmp_path):
    from service.config import Settings
    from workers.graders.base import BUILDERS, GradingContext

    settings = Settings(data_dir=tmp_path / "data")
    grader = BUILDERS["code_tests"](spec(), GradingContext(settings, "team-a"))
    assert settings.resolved_data_dir in grader.hide
    (graded,) = grader.grade([(Sample.of(fenced(SOLUTIONS["sum correct"])), {"tests": SUM})])
    assert graded.reward == 1.0


# -- the parts, without a sandbox ------------------------------------------------------------


def test_the_program_is_the_last_fenced_block_else_the_whole_text():
    text = "Try:\n```\nprint(1)\n```\nBetter:\n```py\nprint(2)\n```\ndone"
    assert program_of(text) == "print(2)\n"
    assert program_of("print(3)") == "print(3)"


@pytest.mark.parametrize(
    ("got", "expected", "same"),
    [
        ("3\n", "3", True),
        ("  1 2  \n3\n\n", "1 2\n3", True),
        ("1  2\n3", "1 2 3", True),  # token by token
        ("0.3333333", "0.33333333", True),  # numbers within 1e-5
        ("0.33", "0.34", False),
        ("1 2", "1 2 3", False),
        ("YES", "yes", False),
    ],
)
def test_stdout_is_compared_as_apps_does(got, expected, same):
    assert same_stdout(got, expected) is same


@pytest.mark.parametrize(
    ("result", "expected", "same"),
    [("3", 3, True), ("3", [3], True), ("[1, 2]", [1, 2], True), ("[3]", [[3]], True)]
    + [("4", [3], False), (None, 3, False), ("[1, 2]", [[1, 3]], False)],
)
def test_return_values_are_compared_as_json_and_unwrapped_as_taco_wraps_them(
    result, expected, same
):
    assert same_return(result, expected) is same


def test_parsed_tests_keep_their_mode_and_function():
    (call,) = parse_tests({"fn_name": "f", "inputs": [5], "outputs": [6]}, "tests")
    assert (call.mode, call.input, call.expected, call.fn_name) == ("call", [5], 6, "f")
