"""Benchmark: how long graders that run user code take, sandbox included.

From the repository root:

    python bench/graders.py [--gradings 1000] [--samples 64] [--tests 10] [--workers N]

Measured, each on its own (wall seconds, and the CPU seconds the machine was busy meanwhile,
which includes anything else it runs):

- `python`, batched: --gradings gradings of a trivial python grader in one grade() call, as a
  run step makes it: one sandbox per CPU (--workers), each loading the source once;
- `python`, one sandbox per grading: the same grader, a new sandbox for each of 50 gradings (what
  batching saves), per grading;
- a sandbox's start and stop alone (bwrap, the interpreter, the harness's first line), 20 times;
- `code_tests`: --samples samples of --tests stdin/stdout tests each (a correct a + b program),
  and the same as function calls (fn_name).

Requires bubblewrap. No assertion: numbers for docs/benchmarks.md ("Graders").
"""

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from service.contract.graders import CodeTestsGrader, PythonGrader  # noqa: E402
from workers.graders.base import Sample  # noqa: E402
from workers.graders.code_tests import CodeTestsSandboxGrader  # noqa: E402
from workers.graders.python import PythonSandboxGrader  # noqa: E402
from workers.graders.sandboxed import SandboxLimits, SandboxSession, harness  # noqa: E402

TRIVIAL = """
def grade(sample, item):
    return float(sample.output_text.strip() == item["answer"])
"""
SUM_PROGRAM = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
ADD_PROGRAM = "```python\ndef add(a, b):\n    return a + b\n```"


def _cpu() -> float:
    """CPU seconds the whole machine has been busy (/proc/stat): the sandboxes' processes are
    not this process's children once bwrap has run them, so this counts them, and whatever
    else the machine runs meanwhile."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def timed(fn) -> tuple[float, float, object]:
    cpu, wall = _cpu(), time.perf_counter()
    out = fn()
    return time.perf_counter() - wall, _cpu() - cpu, out


def python_batched(n: int, workers: int | None) -> tuple[float, float]:
    spec = PythonGrader(type="python", source=TRIVIAL)
    grader = PythonSandboxGrader(spec, workers=workers)
    pairs = [(Sample.of(str(i % 7)), {"answer": str(i % 5)}) for i in range(n)]
    wall, cpu, grades = timed(lambda: grader.grade(pairs))
    expected = [float(i % 7 == i % 5) for i in range(n)]
    assert [g.reward for g in grades] == expected, "wrong rewards"
    return wall, cpu


def python_one_per_sandbox(n: int) -> tuple[float, float]:
    spec = PythonGrader(type="python", source=TRIVIAL)
    grader = PythonSandboxGrader(spec, workers=1)
    pair = (Sample.of("1"), {"answer": "1"})
    wall, cpu, _ = timed(lambda: [grader.grade([pair]) for _ in range(n)])
    return wall, cpu


def sandbox_starts(n: int) -> list[float]:
    limits = SandboxLimits(timeout_s=10, cpu_s=10, memory_mb=1024)
    code, times = harness("python_grader"), []
    for _ in range(n):
        started = time.perf_counter()
        SandboxSession(code, limits).close()
        times.append(time.perf_counter() - started)
    return times


def code_tests(samples: int, tests: int, fn: bool, workers: int | None) -> tuple[float, float]:
    spec = CodeTestsGrader(type="code_tests")
    grader = CodeTestsSandboxGrader(spec, workers=workers)
    if fn:
        table = {"fn_name": "add", "inputs": [[i, i] for i in range(tests)]}
        table["outputs"] = [[2 * i] for i in range(tests)]
        program = ADD_PROGRAM
    else:
        table = {"inputs": [f"{i} {i}\n" for i in range(tests)]}
        table["outputs"] = [f"{2 * i}\n" for i in range(tests)]
        program = SUM_PROGRAM
    pairs = [(Sample.of(program), {"tests": table}) for _ in range(samples)]
    wall, cpu, grades = timed(lambda: grader.grade(pairs))
    assert all(g.reward == 1.0 for g in grades), grades[:3]
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gradings", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tests", type=int, default=10)
    parser.add_argument("--workers", type=int, default=None, help="default: the CPU count")
    args = parser.parse_args()
    workers = args.workers or os.cpu_count()
    print(f"$ python bench/graders.py {shlex.join(sys.argv[1:])}".rstrip())
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"python {platform.python_version()}, sandboxes at once: {workers}\n")

    rows = []
    n = args.gradings
    wall, cpu = python_batched(n, workers)
    rows.append((f"python, {n} gradings, batched", wall, cpu, n, "grading"))
    wall, cpu = python_batched(n, 1)
    rows.append((f"python, {n} gradings, batched, 1 sandbox", wall, cpu, n, "grading"))
    wall, cpu = python_one_per_sandbox(50)
    rows.append(("python, 50 gradings, one sandbox each", wall, cpu, 50, "grading"))
    starts = sandbox_starts(20)
    rows.append(("sandbox start + stop (20)", sum(starts), float("nan"), 20, "sandbox"))
    total = args.samples * args.tests
    for fn in (False, True):
        wall, cpu = code_tests(args.samples, args.tests, fn, workers)
        kind = "fn_name" if fn else "stdin/stdout"
        name = f"code_tests, {args.samples} samples x {args.tests} {kind} tests"
        rows.append((name, wall, cpu, total, "test"))

    print("| what | wall s | machine CPU s | per item (wall) |")
    print("| --- | --- | --- | --- |")
    for name, wall, cpu, count, unit in rows:
        shown = "-" if cpu != cpu else f"{cpu:.2f}"
        print(f"| {name} | {wall:.2f} | {shown} | {1000 * wall / count:.2f} ms / {unit} |")
    print(f"\nsandbox start + stop: median {1000 * statistics.median(starts):.0f} ms")


if __name__ == "__main__":
    main()
